"""Linear layers for CPU generation with their weights kept in oneDNN's own layout (bf16 and fp32).

bf16: `F.linear` on a CPU tensor hands the weight to oneDNN, which reorders it into its blocked layout on
every call. Reordering once at load time and calling oneDNN directly gives the same numbers, bit for bit
(tests/test_rows.py), and reads the weights faster: all matrix-vector products of one demo-model token
took 8.0 ms instead of 11.9 ms (1.45x), 9.2 instead of 13.0 ms for 8 rows.

fp32: `F.linear` goes to MKL, which is slower for a few rows (one token, 1 row: 25.3 ms; oneDNN packed
14.7 ms; 8 rows: 46.4 vs 23.5 ms) and gives a row other bits when it sits in the last, partial block of 4
rows. oneDNN's fp32 kernel treats every row alike from 2 rows on (rows.exact_rows), so fp32 batches, the
default on CPUs without native bf16, also give every row its answer alone. The numbers differ from MKL's
in the last bits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class PackedLinear(nn.Module):
    """A frozen linear layer; `weight` is kept only where asked (the LM head, whose rows top_logits reads)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.weight: Optional[torch.Tensor] = w if keep_weight else None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none",
                                               [], "")
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN's linear runs here for `dtype` (PyTorch's CPU build with mkldnn); checked once per dtype."""
    if dtype not in _AVAILABLE:
        _AVAILABLE[dtype] = _check(dtype)
    return _AVAILABLE[dtype]


_AVAILABLE: dict = {}


def _check(dtype) -> bool:
    if dtype not in (torch.bfloat16, torch.float32):
        return False
    try:
        x = torch.ones(8, 8, dtype=dtype)
        y = PackedLinear(nn.Linear(8, 8, bias=False, dtype=dtype).requires_grad_(False))(x)
        return y.shape == (8, 8)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack(model: nn.Module) -> int:
    """Replace every frozen bf16 or fp32 CPU nn.Linear (LoRA layers' base weights included, their A and B
    not) by a PackedLinear; returns how many. Call after the model is on its device and in its dtype."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and "lora_" not in name and module.weight.device.type == "cpu"
               and available(module.weight.dtype)]
    for name, module in targets:
        model.set_submodule(name, PackedLinear(module, keep_weight=module is head))
    return len(targets)
