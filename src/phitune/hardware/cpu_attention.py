"""Attention for LoRA training on CPU under bf16 autocast, for the short sequences of instruction data.

transformers' eager attention, on CPU under autocast, spent about a fifth of a training step of the demo
model outside its two matmuls (torch.profiler, docs/benchmarks.md): rotary embeddings computed in fp32
because cos/sin follow the fp32 residual stream, copies of k and v for each query head of a group
(grouped-query attention), the scores scaled and masked in separate passes and promoted to fp32 by the
mask, and softmax in fp32 cast back to bf16. This keeps the same arithmetic in bf16, as it runs when
the model is loaded in bf16: cos/sin in bf16, the query scaled before the matmul, each group of query
heads stacked against its shared k and v (no copies; the k and v gradients are summed by the matmul),
the mask added in bf16, softmax on bf16 scores (accumulated in fp32 by the kernel).
"""
from __future__ import annotations

import types
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from phitune.hardware.cpu_lora import BF16

NAME = "phitune_cpu"


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs: Any
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), probabilities)."""
    if dropout or kwargs.get("softcap") or query.device.type != "cpu":
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
    b, h, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    q = (query * scaling).to(BF16).reshape(b, kv_heads, (h // kv_heads) * t, d)
    scores = torch.matmul(q, key.to(BF16).transpose(2, 3)).view(b, h, t, s)
    if attention_mask is not None:
        # fp32's lowest value rounds to -inf in bf16; a fully masked (padding) row would then give NaN.
        # (Not in place: autograd would copy the scores to rewrite a view of the matmul's output.)
        scores = scores + attention_mask[:, :, :, :s].clamp(min=torch.finfo(BF16).min).to(BF16)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.view(b, kv_heads, (h // kv_heads) * t, s), value.to(BF16))
    return out.view(b, h, t, d).transpose(1, 2), probs


def _bf16_rotary(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = type(self).forward(self, x, *args, **kwargs)
    return cos.to(BF16), sin.to(BF16)


def use_cpu_attention(model: torch.nn.Module) -> None:
    """Switch a model training under bf16 autocast on CPU to grouped_attention and bf16 rotary tables."""
    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # the additive float mask eager attention uses
    model.set_attn_implementation(NAME)
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(_bf16_rotary, module)
