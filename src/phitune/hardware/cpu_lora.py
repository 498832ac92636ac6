"""LoRA layers for training on CPU: one pass per layer instead of PEFT's generic path.

Under bf16 autocast PEFT's LoRA linear casts its fp32 input twice (base and adapter), draws the dropout
mask element by element, scales the dropped input in fp32, scales the adapter output, adds it to the
base output, and undoes every cast in backward. On the demo model that elementwise work around the
matmuls cost more than the matmuls themselves (torch.profiler, docs/benchmarks.md). `use_fused_lora`
replaces it, for single-adapter nn.Linear layers, with one autograd function that

- casts the input to bf16 once for all the layers that read it (q, k, v; gate, up), and keeps the
  frozen base weight in bf16 (autocast casts it to bf16 for every matmul anyway, so the result is
  the same and the weight takes half the memory);
- draws the dropout sparsely: only the ~p*n dropped positions are drawn, filled with zeros in a copy
  of the bf16 input, and kept as indices for backward (no dense mask is written or stored);
- folds the dropout's 1/(1-p) into the LoRA scaling, applied on the rank-r side by `addmm`;
- computes in backward only what is needed: no gradient for the frozen weight, none for the input
  when it does not require one (the first layer's), and the input gradient of base and adapter
  accumulated into one buffer by `addmm_`.

On CPUs without native bf16 (AVX2 only; bf16 is emulated there and far slower) training computes in
fp32, and the same function runs without any cast (compute_dtype=torch.float32): what remains of the
savings is the sparse dropout, the scaling folded into `addmm`, and the leaner backward.

Numerics match PEFT under autocast up to bf16 rounding, and PEFT in fp32 up to float rounding
(tests/test_cpu_lora.py).
"""
from __future__ import annotations

import math
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BF16 = torch.bfloat16


def dropped_positions(n: int, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Flat positions (int64, possibly repeated) of the elements of an n-element tensor that dropout
    with probability p drops: each element independently, with probability exactly p."""
    rate = -math.log1p(-p)
    if rate <= 0.5:
        # Sparse draw for the usual small p: Poisson(n * rate) positions, uniform with repetition. Each
        # element is then hit Poisson(rate) times independently of the others, so it is dropped with
        # probability 1 - exp(-rate) = p: iid Bernoulli(p) from ~p*n random numbers instead of n, and no
        # dense mask to write, apply and keep for backward.
        k = int(torch.poisson(torch.tensor([n * rate], dtype=torch.float64)).item())
        return torch.randint(0, n, (k,), device=device)
    # Larger p: four 16-bit uniforms per 64-bit random word (p exact to 1/32768).
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return torch.nonzero(bits.view(torch.int16)[:n] < round(p * 65536) - 32768).squeeze(1)


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str | None = None
              ) -> torch.Tensor:
    """Boolean mask, True where an element is dropped; the same draw as dropped_positions."""
    idx = dropped_positions(math.prod(shape), p, device)
    return torch.zeros(math.prod(shape), dtype=torch.bool, device=device).index_fill_(0, idx, True).view(shape)


class FastDropout(nn.Module):
    """nn.Dropout with dropped_positions' cheaper draws, for LoRA layers the fused path does not cover."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x scaled by 1/(1-p) with dropped elements zeroed in training; x itself in eval or for p=0."""
        if not self.training or self.p == 0:
            return x
        return (x * (1.0 / (1.0 - self.p))).masked_fill(drop_mask(x.shape, self.p, x.device), 0)

    def extra_repr(self) -> str:
        """Shown in print(model), as nn.Dropout shows its p."""
        return f"p={self.p}"


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + (scale / (1-p)) * (drop(x) A^T) B^T in W's dtype (bf16 or fp32), W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, p):
        shape, dtype = x.shape, weight.dtype
        xc = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        y = F.linear(xc, weight, bias)
        dropped = dropped_positions(xc.numel(), p, xc.device) if p > 0 else None
        xd = xc
        if dropped is not None:
            xd = xc.clone()
            xd.view(-1).index_fill_(0, dropped, 0)
        u = xd @ a.t()
        alpha = scale / (1.0 - p)
        y.addmm_(u, b.t(), alpha=alpha)
        # The dropped positions are kept as indices (~p of the elements), not as a dense mask.
        ctx.save_for_backward(xd, dropped, u, weight, a, b)
        ctx.alpha, ctx.x_dtype, ctx.x_shape = alpha, x.dtype, shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xd, dropped, u, weight, a, b = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1]).to(weight.dtype)
        gu = (g @ b).mul_(ctx.alpha)
        grad_a = (gu.t() @ xd).to(ctx.param_dtypes[0])
        grad_b = (g.t() @ u).mul_(ctx.alpha).to(ctx.param_dtypes[1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxd = gu @ a
            if dropped is not None:
                gxd.view(-1).index_fill_(0, dropped, 0)
            grad_x = gxd.addmm_(g, weight).to(ctx.x_dtype).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None


class _SharedCast:
    """The bf16 copy of the last layer input: q, k and v (and gate and up) read the same tensor, so one
    cast (and one cast of its gradient in backward) serves them all."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, x, dtype):
        if x.dtype == dtype:
            return x
        key = (weakref.ref(x), x._version, torch.is_grad_enabled(), dtype)
        if self.key is not None and self.key[0]() is x and self.key[1:] == key[1:]:
            return self.value
        self.key, self.value = key, x.to(dtype)
        return self.value


_shared_cast = _SharedCast()


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    base = self.base_layer
    dtype = base.weight.dtype
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self._phitune_fused or x.device.type != "cpu"
            or (dtype != BF16 and torch.is_autocast_enabled("cpu"))):
        # Anything unusual (an fp32-fused layer under autocast too) takes PEFT's own path; a base weight
        # stored in bf16 means the model computes in bf16.
        if dtype != BF16:
            return type(self).forward(self, x, *args, **kwargs)
        with torch.autocast("cpu", dtype=BF16):
            return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    drop = self.lora_dropout[name]
    p = float(getattr(drop, "p", 0.0)) if self.training else 0.0
    return _LoraLinear.apply(_shared_cast(x, dtype), base.weight, base.bias, self.lora_A[name].weight,
                             self.lora_B[name].weight, float(self.scaling[name]), p)


def _fusable(module: nn.Module, name: str) -> bool:
    base = getattr(module, "base_layer", None)
    return (type(base) is nn.Linear and name in module.lora_A and name not in getattr(module, "lora_variant", {})
            and not getattr(module, "fan_in_fan_out", False) and not getattr(module, "lora_bias", {}).get(name)
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and isinstance(module.lora_dropout[name], (nn.Dropout, nn.Identity)))


def use_fused_lora(peft_model: nn.Module, compute_dtype: torch.dtype | None = BF16) -> int:
    """Route single-adapter LoRA linears through _LoraLinear for CPU training.

    compute_dtype: torch.bfloat16 (training under bf16 autocast: the frozen base weights are stored in
    bf16), torch.float32 (training in fp32, no autocast), or None to fuse nothing. Other LoRA layers (DoRA,
    several adapters, ...; all of them when compute_dtype is None) get FastDropout. Returns the number of
    fused layers."""
    if compute_dtype not in (None, BF16, torch.float32):
        raise ValueError(f"use_fused_lora: compute_dtype must be torch.bfloat16, torch.float32 or None, "
                         f"not {compute_dtype}")
    fused = 0
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        names = {n for n in drops if compute_dtype is not None and _fusable(module, n)}
        if names:
            base = module.base_layer
            base.weight.data = base.weight.data.to(compute_dtype)
            if base.bias is not None:
                base.bias.data = base.bias.data.to(compute_dtype)
            module._phitune_fused = names
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
        for n, drop in list(drops.items()):
            if n not in names and isinstance(drop, nn.Dropout) and drop.p > 0:
                drops[n] = FastDropout(drop.p)
    return fused
