"""The best few logits of a bf16 (or int8) head, recomputed in fp32.

A bf16 matmul adds in fp32 but rounds its result to bf16: at a logit of 25 that is a step of 0.125, and
in a vocabulary of 50,000 the two best tokens are often closer than that. They then come out equal (or
in the wrong order) and greedy decoding takes whichever has the lower id. On the demo model the base's
answer to "What is the capital of France?" turned on exactly that: fp32 logits 25.33 ("The") vs 25.24
("L'"), both 25.5 in bf16. Every logit within a few bf16 steps of the best one is recomputed here as an
fp32 dot product of the head's input and that token's weight row, which costs a few hundred
multiply-adds per candidate, against re-running the whole head in fp32 (49,152 x 576 weights per token).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from phitune.generation import rows
from phitune.generation.int8 import Int8Linear
from phitune.generation.packed import PackedLinear


class TopLogits:
    """Hooks the model's output layer to keep its input; refine() sharpens the near-best logits."""

    def __init__(self, model: nn.Module):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        self.head = base.get_output_embeddings()
        config = base.config
        scaled = any(getattr(config, name, None) not in (None, 1.0)
                     for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        weight = self.head.scale if isinstance(self.head, Int8Linear) else getattr(self.head, "weight", None)
        # Only a plain (or int8) linear head whose logits the model does not rescale, computed below fp32.
        self.active = (not scaled and weight is not None and weight.dtype in (torch.bfloat16, torch.float16)
                       and isinstance(self.head, (nn.Linear, Int8Linear, PackedLinear)))
        self.hidden: Optional[torch.Tensor] = None
        if self.active:
            self.head.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        if rows.current() is not None:  # engine forwards only: a loss batch's hidden states are not kept
            self.hidden = inputs[0]

    def refine(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) fp32 logits of the last position -> the same with the near-best ones exact."""
        if not self.active or self.hidden is None:
            return logits
        hidden, self.hidden = self._last_positions(self.hidden), None
        if hidden is None or len(hidden) != len(logits):
            return logits
        best = logits.max(-1, keepdim=True).values
        near = logits >= best - best.abs() * 2 ** -5 - 1e-6  # four bf16 steps below the best
        for row in torch.nonzero(near.sum(-1) > 1).flatten().tolist():
            ids = torch.nonzero(near[row]).flatten()
            logits[row, ids] = self._exact(hidden[row], ids)
        return logits

    def _last_positions(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """(rows, h) head inputs of each row's last position; None when that cannot be told."""
        if hidden.dim() == 3:
            return hidden[:, -1]
        outer = self.base.get_output_embeddings()  # rows.PadRows while the engine's layers are in
        lead = getattr(outer, "lead", None)
        if hidden.dim() != 2 or lead is None or len(lead) not in (1, 2):
            return None
        if len(lead) == 1:
            return hidden[:lead[0]]
        return hidden[:lead.numel()].reshape(*lead, hidden.shape[-1])[:, -1]

    def _exact(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        if isinstance(head, Int8Linear):
            rows = head.qweight[ids].float() * head.scale[ids].float()[:, None]
        else:
            rows = head.weight[ids].float()
        # An elementwise product and a sum per row: the same order for every row, whatever the batch.
        out = (rows * h.float()).sum(-1)
        if head.bias is not None:
            out = out + head.bias[ids].float()
        return out
