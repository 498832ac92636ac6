"""Answer-token loss: the LM head and cross-entropy run only where a label is trained.

Computing logits for every position wastes most of the head's FLOPs and memory (the vocabulary is
32k-51k wide) when only the answer is trained; selecting the positions first avoids both. With a
frozen head the loss and its gradient are computed together, chunk by chunk (_HeadLoss), so no
(tokens x vocab) tensor is kept for backward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from phitune.data.records import IGNORE, collate

if TYPE_CHECKING:
    from peft import PeftModel

# Chunk the head+CE over answer positions so the (tokens x vocab) logits never exist all at once.
CHUNK = 2048
# Smaller chunks on CPU keep the working set near the cache; with reused buffers the head+CE of 554
# answer tokens of the demo model took 210-250 ms for chunks of 32 to 2,048 rows, 441 ms before.
CPU_CHUNK = 256


class AnswerLoss(nn.Module):
    """forward(batch) -> (summed cross-entropy over trained tokens, number of trained tokens).

    A module (not a function) so that Accelerate can wrap it for data-parallel training.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        self.model = peft_model
        causal_lm = peft_model.get_base_model()
        self.decoder = causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        # Logits that are the head's output times a constant (Granite divides by logits_scaling, Cohere
        # multiplies by logit_scale) take the fast path with the hidden state scaled, which is the same for a
        # head without bias; anything else the fast path cannot reproduce goes through the model's forward.
        cfg = causal_lm.config
        self.scale = 1.0 / getattr(cfg, "logits_scaling", 1.0) * (getattr(cfg, "logit_scale", None) or 1.0)
        biased = getattr(self.head, "bias", None) is not None
        self.fast = not (getattr(cfg, "final_logit_softcapping", None) or (self.scale != 1.0 and biased))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch tensors (B, T) -> (summed cross-entropy over trained labels, number of trained labels)."""
        targets = labels[:, 1:]
        keep = targets != IGNORE  # (B, T-1): positions whose next token is trained
        if not self.fast:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[:, :-1][keep]  # (N, d): only trained positions reach the head
        if self.scale != 1.0:
            hidden = hidden * self.scale
        wanted = targets[keep]
        head = self.head
        if type(head) is nn.Linear and not head.weight.requires_grad and \
                (head.bias is None or not head.bias.requires_grad):
            dtype = torch.get_autocast_dtype(hidden.device.type) \
                if torch.is_autocast_enabled(hidden.device.type) else head.weight.dtype
            weight, bias = self._cast_head(dtype)
            grad = torch.is_grad_enabled() and hidden.requires_grad
            return _HeadLoss.apply(hidden, weight, bias, wanted, grad), keep.sum()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], CHUNK):
            logits = self.head(hidden[start:start + CHUNK]).float()  # (n, vocab)
            total = total + F.cross_entropy(logits, wanted[start:start + CHUNK], reduction="sum")
        return total, keep.sum()

    def _cast_head(self, dtype):
        """The frozen head in the compute dtype, cast once rather than at every step."""
        w, b = self.head.weight, self.head.bias
        if w.dtype == dtype:
            return w, b
        key = (dtype, w.data_ptr(), w._version, w.device)
        if getattr(self, "_head_key", None) != key:
            self._head_key = key
            self._head_cast = (w.detach().to(dtype), None if b is None else b.detach().to(dtype))
        return self._head_cast


class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T + bias against `wanted`, for a frozen head.

    The gradient is computed in the same pass as the loss (softmax minus one-hot, times the weight),
    chunk by chunk, so backward only scales it: no logits are kept, and none are recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, wanted, with_grad):
        total, grad = _head_cross_entropy(hidden, weight, bias, wanted, with_grad, per_token=False)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None, None


class _HeadTokenLoss(torch.autograd.Function):
    """_HeadLoss per token: the cross-entropy of each row of `hidden` (N,), fp32, for a frozen head.

    For losses that weigh tokens by sequence (preference tuning sums log-probs per answer): backward
    scales each row's precomputed gradient by that token's incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, wanted, with_grad):
        losses, grad = _head_cross_entropy(hidden, weight, bias, wanted, with_grad, per_token=True)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return (grad * grad_losses.to(grad.dtype)[:, None]).to(ctx.hidden_dtype), None, None, None, None


def _head_cross_entropy(hidden, weight, bias, wanted, with_grad, per_token):
    """(summed or per-token fp32 cross-entropy, gradient of each token's loss w.r.t. its hidden row or None)."""
    h = hidden.to(weight.dtype)
    if per_token:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
    else:
        out = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(h) if with_grad else None
    chunk = CPU_CHUNK if h.device.type == "cpu" else CHUNK
    low = fp32 = None  # per-chunk buffers, reused: fresh ones cost page faults on every chunk on CPU
    for start in range(0, h.shape[0], chunk):
        rows = h[start:start + chunk]
        if fp32 is None or fp32.shape[0] != rows.shape[0]:
            fp32 = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
            low = fp32 if weight.dtype == torch.float32 else torch.empty_like(fp32, dtype=weight.dtype)
        if bias is None:
            torch.mm(rows, weight.t(), out=low)
        else:
            torch.addmm(bias, rows, weight.t(), out=low)
        if low is not fp32:
            fp32.copy_(low)
        logits = fp32  # (n, vocab)
        target = wanted[start:start + chunk, None]
        picked = logits.gather(1, target)
        top = logits.amax(dim=-1, keepdim=True)
        exps = logits.sub_(top).exp_()
        norm = exps.sum(dim=-1, keepdim=True)
        if per_token:
            out[start:start + chunk] = (top + norm.log() - picked).squeeze(1)
        else:
            out += (top + norm.log() - picked).sum()
        if with_grad:
            probs = exps.div_(norm)
            probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
            if low is not fp32:
                low.copy_(probs)
            torch.mm(low, weight, out=grad[start:start + chunk])
    return out, grad


@torch.no_grad()
def summed_loss(loss_model: nn.Module, examples: list[dict[str, list[int]]], batch_size: int, pad_id: int,
                device: torch.device, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, trained tokens) over this process's share of `examples`, batched by length."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device, dtype=torch.long)
    for start in range(rank * batch_size, len(order), batch_size * world):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        loss_sum, n = loss_model(**{k: v.to(device) for k, v in batch.items()})
        total, count = total + loss_sum.float(), count + n
    return total, count
