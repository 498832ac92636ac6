"""Rows of different adapters (and the base) in one forward pass, with a fixed cost per layer.

PEFT's mixed-adapter forward (`adapter_names=`) loops over the adapters present in every LoRA layer,
selecting and scattering each adapter's rows: with base + two adapters that is ~20 small operations per
layer and slower than running the models one after another (bench/generate_throughput.py). Here each
LoRA linear keeps its adapters' A and B stacked (slot 0 is zeros: the base), and one gathered pair of
batched matmuls adds every row's own update:

    out = base(x) + ((x @ A[slot].T) @ B[slot].T)          x (B, T, in), A[slot] (B, r, in), B[slot] (B, out, r)

with each adapter's scaling folded into its B and smaller ranks zero-padded to the largest.
"""
from __future__ import annotations

import torch
from torch import nn


class MixedLora:
    """Stacked LoRA weights of every adapter of a PEFT model, applied per row through base-layer hooks."""

    def __init__(self, peft_model: nn.Module, names: list):
        from peft.tuners.lora import Linear as LoraLinear
        self.model, self.names = peft_model, list(names)
        self.slots = {None: 0, **{n: i + 1 for i, n in enumerate(self.names)}}
        self.layers = []  # (base layer, A (n+1, r, in), B (n+1, out, r))
        for module in peft_model.modules():
            if not isinstance(module, LoraLinear):
                continue
            base = module.get_base_layer()
            rank = max(module.lora_A[n].weight.shape[0] for n in self.names if n in module.lora_A)
            a = base.weight.new_zeros(len(self.names) + 1, rank, base.in_features)
            b = base.weight.new_zeros(len(self.names) + 1, base.out_features, rank)
            for n in self.names:
                if n in module.lora_A:
                    r = module.lora_A[n].weight.shape[0]
                    a[self.slots[n], :r] = module.lora_A[n].weight.detach()
                    b[self.slots[n], :, :r] = module.lora_B[n].weight.detach() * module.scaling[n]
            self.layers.append((base, a, b))

    @staticmethod
    def supports(peft_model: nn.Module) -> bool:
        """Plain LoRA on nn.Linear layers only (no DoRA or other variants, no LoRA on embeddings)."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                if not isinstance(module, LoraLinear) or getattr(module, "lora_variant", None) or \
                        not isinstance(module.get_base_layer(), nn.Linear):
                    return False
        return not any(getattr(c, "use_dora", False) for c in peft_model.peft_config.values())

    def forward(self, adapters: list, **kwargs) -> object:
        """model(**kwargs) with row i using adapter adapters[i] (None: the base)."""
        slot = torch.tensor([self.slots[a] for a in adapters], device=self.layers[0][1].device)
        gathered = [(a.index_select(0, slot), b.index_select(0, slot)) for _, a, b in self.layers]

        def hook(index):
            a, b = gathered[index]

            def add_update(module, inputs, output):
                x = inputs[0]
                return output + torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)).to(
                    output.dtype)
            return add_update
        handles = [base.register_forward_hook(hook(i)) for i, (base, _, _) in enumerate(self.layers)]
        try:
            with self.model.disable_adapter():  # PEFT's own LoRA pass is off: only the hooks add updates
                return self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()
