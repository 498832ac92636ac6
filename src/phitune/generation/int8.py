"""Weight-only int8 for generation (`--precision int8`): each linear weight stored as int8 with one scale per
output row, multiplied against bf16 activations.

Decoding one token reads every weight once, so on a CPU a token costs about what reading the weights costs:
int8 halves bf16's bytes, and PyTorch's int8 x bf16 kernel (`_weight_int8pack_mm`) reads them faster than
its bf16 kernel reads bf16 (bench/generate_throughput.py). Rounding each weight to 1/127 of its row's largest
magnitude is what llama.cpp's Q8_0 does per 32 values; answers stay close to bf16's but are not the fp32
model's bit for bit, which is why it is a choice and not a default.

LoRA layers keep their adapters in bf16; only the frozen base weight inside is quantized, so adapters still
switch per row (mixed batches) on top of it. The embedding stays bf16 (a lookup reads one row per token).
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with q int8 (out, in) and scale (out,) in the activation dtype."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        # The kernel takes the scales in the activation dtype: round them up to it first (so no weight
        # needs more than 127 steps), then round each weight to the nearest step of its row's scale.
        scale = (scale * (1 + 2 ** -7)).to(dtype)
        self.register_buffer("qweight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)  # CPU only: load() refuses others
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every frozen nn.Linear (LoRA layers' base weights included, their A and B not) by Int8Linear.

    Returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and "lora_" not in name]
    for name, module in targets:
        model.set_submodule(name, Int8Linear(module, dtype))
    return len(targets)
