"""A cheaper dropout for LoRA inputs on CPU.

PEFT applies nn.Dropout to the input of every adapted layer; on CPU the per-element Bernoulli draws
took 31% of a LoRA step on the demo model (torch.profiler, docs/benchmarks.md). This draws 64 random
bits per RNG call and uses them as four 16-bit uniforms, so a quarter of the draws give the same mask
distribution (keep probability exact to 1/65536).
"""
import torch
from torch import nn


class FastDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = float(p)
        self.threshold = int(-32768 + round(self.p * 65536))  # int16 uniforms below it are dropped

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), x.new_zeros(()))

    def extra_repr(self):
        return f"p={self.p}"


def use_fast_dropout(peft_model):
    """Swap PEFT's LoRA dropout modules for FastDropout (CPU only: CUDA's dropout is already fused)."""
    swapped = 0
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, drop in list(drops.items()):
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    drops[name] = FastDropout(drop.p)
                    swapped += 1
    return swapped
