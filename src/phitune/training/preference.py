"""Preference losses: DPO and ORPO on pairs of a chosen and a rejected answer (data/pairs.py).

A batch holds 2B rows [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1] (pairs.collate_pairs), so both
answers of a pair go through the model in one forward. Definitions (TRL 1.16's DPOTrainer and ORPOTrainer;
tests/test_preference.py checks loss and gradients against them):

  logp(seq)  = sum over the answer's tokens t of log softmax(logits[t-1])[token t]  (end-of-turn included)
  DPO        loss = mean over pairs of -logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))
             reward = beta * (logp - ref logp); the reference is the policy training started from, its
             log-probs computed once before the first step (reference_logps)
             with rpo_alpha > 0 (RPO): + rpo_alpha * NLL of the chosen answers (token mean), which keeps the
             chosen answers likely while the margin grows (TRL: loss_type ["sigmoid", "sft"], loss_weights
             [1, rpo_alpha])
  ORPO       avg = logp / answer tokens;  log_odds = (avg_c - avg_r) - (log(1 - e^avg_c) - log(1 - e^avg_r))
             loss = NLL of the chosen answers (token mean) + beta * mean over pairs of -logsigmoid(log_odds)
             reward = beta * avg (no reference model). beta is ORPO's lambda, as TRL's ORPOConfig names it.
             TRL's NLL term covers the chosen prompt too; phitune's covers the answer, as supervised
             training does, and the prompt as well with --train_on_prompt (then it equals TRL's).

Metrics per step and on validation (the same names TRL logs, shortened): loss, rewards/chosen,
rewards/rejected, margin (mean reward difference), accuracy (share of pairs whose chosen reward is strictly
higher); ORPO adds nll, log_odds (mean log odds ratio) and log_odds_ratio (mean logsigmoid of it).

Public API for other commands:
  PairLogps(peft_model)                  module: batch -> (per-row answer log-prob sums, answer tokens, NLL
                                         sum, NLL tokens); the training forward (CPU fused LoRA, autocast)
  pair_logps(model, batch, average)      -> (chosen_logps, rejected_logps) for a collated pair batch
  dpo_loss(...), orpo_loss(...)          per-pair losses and rewards from log-probs
  Objective(method, beta, rpo_alpha)     what one step computes from a PairLogps output; pair_metrics
  reference_logps(...)                   the reference log-probs of every pair, batched by length
  pair_stats(...)                        summed validation statistics over held-out pairs
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from phitune.data import pairs as pair_data
from phitune.data.templates import IGNORE
from phitune.training.loss import CHUNK, AnswerLoss, _HeadTokenLoss

if TYPE_CHECKING:
    from peft import PeftModel

METHODS = ("sft", "dpo", "orpo")
DEFAULT_BETA = 0.1
# Order of the summed statistics a step or a validation pass reduces across processes.
STATS = ("pairs", "nll_tokens", "pair_loss", "nll", "chosen", "rejected", "correct", "log_odds", "log_odds_ratio")


class PairLogps(AnswerLoss):
    """forward(batch) -> (per-row summed answer log-probs (2B,), answer tokens per row (2B,), summed NLL of
    the chosen rows, NLL tokens).

    The NLL covers the chosen rows' answer tokens, or every token of `nll_labels` when the batch has them.
    The same decoder + answer-only LM head path as AnswerLoss (the head's frozen-weight fast path included),
    with the cross-entropy kept per token. A module so that Accelerate can wrap it for data-parallel training.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                nll_labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch tensors (2B, T) -> (logps (2B,), counts (2B,), nll_sum, nll_count)."""
        rows_n = input_ids.shape[0]
        targets = labels[:, 1:]
        answer = targets != IGNORE  # (R, T-1): positions whose next token is an answer token
        if nll_labels is None:
            nll = answer.clone()
            nll[rows_n // 2:] = False
            keep, wanted_all = answer, targets
        else:
            nll_targets = nll_labels[:, 1:]
            nll = nll_targets != IGNORE
            keep = answer | nll
            wanted_all = torch.where(answer, targets, nll_targets)
        wanted = wanted_all[keep]
        ce = self._token_cross_entropy(input_ids, attention_mask, keep, wanted)  # (N,) fp32
        rows = torch.arange(rows_n, device=input_ids.device)[:, None].expand_as(keep)[keep]
        in_answer, in_nll = answer[keep], nll[keep]
        logps = torch.zeros(rows_n, dtype=torch.float32, device=ce.device).index_add(
            0, rows[in_answer], -ce[in_answer])
        return logps, answer.sum(1), ce[in_nll].sum(), nll.sum()

    def _token_cross_entropy(self, input_ids, attention_mask, keep, wanted):
        if not self.fast:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
            return F.cross_entropy(logits.float(), wanted, reduction="none")
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[:, :-1][keep]
        if self.scale != 1.0:
            hidden = hidden * self.scale
        head = self.head
        if type(head) is nn.Linear and not head.weight.requires_grad and \
                (head.bias is None or not head.bias.requires_grad):
            dtype = torch.get_autocast_dtype(hidden.device.type) \
                if torch.is_autocast_enabled(hidden.device.type) else head.weight.dtype
            weight, bias = self._cast_head(dtype)
            grad = torch.is_grad_enabled() and hidden.requires_grad
            return _HeadTokenLoss.apply(hidden, weight, bias, wanted, grad)
        return torch.cat([F.cross_entropy(self.head(hidden[s:s + CHUNK]).float(), wanted[s:s + CHUNK],
                                          reduction="none") for s in range(0, hidden.shape[0], CHUNK)])


def pair_logps(model: PeftModel | PairLogps, batch: dict[str, torch.Tensor], average: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps), each (B,): the summed (average=True: per-token mean) log-probs of each
    pair's answers under `model` (a PEFT/causal LM model, or a PairLogps built on one) for a batch from
    pairs.collate_pairs. Gradients flow unless called under torch.no_grad()."""
    module = model if isinstance(model, PairLogps) else PairLogps(model)
    logps, counts, _, _ = module(batch["input_ids"], batch["attention_mask"], batch["labels"])
    if average:
        logps = logps / counts.clamp(min=1)
    return logps.chunk(2)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = DEFAULT_BETA
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair, and the rewards beta * (logp - ref logp) of chosen and rejected (detached)."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (x is kept below 0 so a certain answer stays finite)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float = DEFAULT_BETA
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair (beta * -logsigmoid(log odds ratio)), the log odds ratio, and the
    rewards beta * average log-prob of chosen and rejected (detached). Inputs: per-token mean log-probs."""
    c, r = chosen_avg.float(), rejected_avg.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -beta * F.logsigmoid(log_odds), log_odds, (beta * c).detach(), (beta * r).detach()


class Objective:
    """What a DPO or ORPO step computes from PairLogps' output: the loss to back-propagate and the statistics
    (summed over the pairs seen, in STATS order) that make the step's and validation's metrics."""

    def __init__(self, method: str, beta: float = DEFAULT_BETA, rpo_alpha: float = 0.0) -> None:
        if method not in ("dpo", "orpo"):
            raise ValueError(f"method must be dpo or orpo, got {method!r}")
        if rpo_alpha and method != "dpo":
            raise ValueError("rpo_alpha is a DPO setting (ORPO has its own NLL term)")
        self.method, self.beta = method, beta
        # the weight of the chosen answers' NLL in the loss: ORPO's own term, or DPO's RPO term (0: none)
        self.nll_weight = 1.0 if method == "orpo" else rpo_alpha

    def norms(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(pairs, NLL tokens) of a collated batch: what the step's loss terms are averaged over."""
        pairs = batch["input_ids"].shape[0] // 2
        if "nll_labels" in batch:
            tokens = (batch["nll_labels"][:, 1:] != IGNORE).sum()
        else:
            tokens = (batch["labels"][:pairs, 1:] != IGNORE).sum()
        return torch.tensor([float(pairs), float(tokens)])

    def terms(self, out: tuple[torch.Tensor, ...], ref_logps: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed pair losses, summed NLL, statistics vector) for one forward's output; the first two
        carry gradients."""
        logps, counts, nll_sum, nll_count = out
        chosen, rejected = logps.chunk(2)
        zero = logps.new_zeros(())
        if self.method == "dpo":
            if ref_logps is None:
                raise ValueError("DPO needs the reference log-probs of the batch (ref_logps)")
            ref = ref_logps.to(logps.device)
            losses, rc, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)
            if not self.nll_weight:
                nll_sum = zero
            log_odds = ratio = zero
        else:
            n_c, n_r = counts.chunk(2)
            losses, odds, rc, rr = orpo_loss(chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1), self.beta)
            log_odds, ratio = odds.detach().sum(), F.logsigmoid(odds.detach()).sum()
        pair_loss = losses.sum()
        stats = torch.stack([torch.tensor(float(len(chosen)), device=logps.device),
                             nll_count.to(logps.device, torch.float32), pair_loss.detach(), nll_sum.detach().float(),
                             rc.sum(), rr.sum(), (rc > rr).float().sum(), log_odds, ratio])
        return pair_loss, nll_sum, stats

    def loss(self, pair_loss: torch.Tensor, nll_sum: torch.Tensor, pairs: torch.Tensor, nll_tokens: torch.Tensor
             ) -> torch.Tensor:
        """The step's loss from summed terms and the step's totals (mean over pairs, NLL mean over tokens)."""
        loss = pair_loss / pairs.clamp(min=1)
        if self.nll_weight:
            loss = loss + self.nll_weight * nll_sum / nll_tokens.clamp(min=1)
        return loss

    def metrics(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """Mean metrics from summed statistics (STATS order, over every process), named with `prefix`."""
        s = dict(zip(STATS, stats.double().tolist()))
        pairs, tokens = max(s["pairs"], 1.0), max(s["nll_tokens"], 1.0)
        out = {"loss": s["pair_loss"] / pairs + self.nll_weight * s["nll"] / tokens,
               "rewards/chosen": s["chosen"] / pairs, "rewards/rejected": s["rejected"] / pairs,
               "margin": (s["chosen"] - s["rejected"]) / pairs, "accuracy": s["correct"] / pairs}
        if self.nll_weight:
            out["nll"] = s["nll"] / tokens
        if self.method == "orpo":
            out.update(log_odds=s["log_odds"] / pairs, log_odds_ratio=s["log_odds_ratio"] / pairs)
        return {prefix + k: v for k, v in out.items()}


def split_pairs(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A collated pair batch cut into up to `parts` batches of whole pairs (each keeps its chosen and rejected
    rows, in the same [chosen..., rejected...] layout)."""
    if parts == 1:
        return [batch]
    pairs = batch["input_ids"].shape[0] // 2
    size = -(-pairs // parts)
    out = []
    for s in range(0, pairs, size):
        e = min(s + size, pairs)
        piece = {k: torch.cat([v[s:e], v[pairs + s:pairs + e]]) for k, v in batch.items() if k != "ref_logps"}
        if "ref_logps" in batch:
            piece["ref_logps"] = batch["ref_logps"][s:e]
        out.append(piece)
    return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a pair batch that PairLogps takes (everything but the reference log-probs)."""
    return {k: v for k, v in batch.items() if k != "ref_logps"}


@torch.no_grad()
def reference_logps(module: nn.Module, examples: list[dict[str, Any]], batch_size: int, pad_id: int,
                    device: torch.device, rank: int = 0, world: int = 1) -> torch.Tensor:
    """(n_pairs, 2) summed log-probs of (chosen, rejected) under `module` (PairLogps) as it is now, for this
    process's share of `examples` (every world-th batch from rank); the other rows stay 0, so a sum over
    processes gives every pair's. Batched by length; the caller sets eval mode and autocast."""
    out = torch.zeros((len(examples), 2), dtype=torch.float32)
    order = sorted(range(len(examples)), key=lambda i: pair_data.pair_length(examples[i]))
    for start in range(rank * batch_size, len(order), batch_size * world):
        idx = order[start:start + batch_size]
        batch = pair_data.collate_pairs([examples[i] for i in idx], pad_id)
        logps, _, _, _ = module(**{k: v.to(device) for k, v in batch.items()})
        chosen, rejected = logps.float().cpu().chunk(2)
        out[idx, 0], out[idx, 1] = chosen, rejected
    return out


@torch.no_grad()
def pair_stats(module: nn.Module, objective: Objective, examples: list[dict[str, Any]], ref: torch.Tensor | None,
               batch_size: int, pad_id: int, device: torch.device, rank: int = 0, world: int = 1,
               nll_on_prompt: bool = False) -> torch.Tensor:
    """Summed statistics (STATS order) over this process's share of `examples`; reduce over processes, then
    objective.metrics(). `ref`: (n_pairs, 2) reference log-probs, for DPO."""
    total = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    order = sorted(range(len(examples)), key=lambda i: pair_data.pair_length(examples[i]))
    for start in range(rank * batch_size, len(order), batch_size * world):
        idx = order[start:start + batch_size]
        batch = pair_data.collate_pairs([examples[i] for i in idx], pad_id,
                                        ref_logps=None if ref is None else ref[idx], nll_on_prompt=nll_on_prompt)
        batch = {k: v.to(device) for k, v in batch.items()}
        _, _, stats = objective.terms(module(**model_inputs(batch)), batch.get("ref_logps"))
        total += stats.double()
    return total
