"""The decoding engine behind chat, compare, eval and serve.

One batch of rows decodes together, one token per row per step. Each row carries its own prompt,
adapter (or the base), sampling settings, stop tokens, stop strings and token limit. Rows join the
batch between steps (their prompts are prefilled, then their KV cache is left-padded into the batch's)
and leave it as soon as they finish, so a server can batch requests that arrive at different times.

Rows of the base and of any adapters share batches: every LoRA layer adds each row's own adapter update
(rows.py), and attention runs on each row's own tokens, so a row's answer is the one it gets alone. chat,
which talks to one adapter all session, loads it merged into the weights instead (generate.load).
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from phitune.generation import rows
from phitune.generation.rows import RowLora
from phitune.generation.top_logits import TopLogits

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


GREEDY_BELOW = 1e-5  # a smaller temperature divides the logits into inf/nan; it means "greedy" anyway


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return not self.temperature >= GREEDY_BELOW  # also True for nan, which problem() refuses

    def problem(self) -> Optional[tuple]:
        """(field, what is wrong) for the first setting the engine cannot use, else None."""
        import math
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return name, f"must be a finite number, got {value}"
        if self.temperature < 0:
            return "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return "top_p", f"must be in (0, 1], got {self.top_p}"
        if self.repetition_penalty <= 0:
            return "repetition_penalty", f"must be positive, got {self.repetition_penalty}"
        if self.top_k < 0:
            return "top_k", f"must be >= 0 (0 = off), got {self.top_k}"
        if self.max_new_tokens < 1:
            return "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}"
        return None


class TextStream:
    """Token ids in, text out: holds back a tail that may still become a stop string, and cuts at one.

    The one stop-string implementation used by chat, compare, eval and serve. Each push costs the same
    however long the answer already is: only the newest tokens are decoded (with the token before them, so
    that spaces and multi-byte characters come out as a whole decode has them) and only the tail that the
    new text can complete is searched for stop strings."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tok = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything decoded so far (before any cut)
        self.sent = 0  # characters already handed out
        self.hit = False
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`: context for decoding the next ones
        self._read = 0  # ids already decoded into `text`

    def push(self, ids: list, final: bool = False) -> str:
        """All generated ids so far -> the new text that is safe to show (nothing more after a stop string)."""
        if self.hit:
            return ""
        new = self._decode(ids, final)
        if new is None:  # a multi-byte character is still incomplete
            return ""
        start = len(self.text)
        self.text += new
        text = self.text
        # a stop string not seen before ends in the new characters
        found = (text.find(s, max(0, start - len(s) + 1)) for s in self.stops)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            return self._emit(cut)
        keep = 0 if final else self._partial_tail(text)
        return self._emit(len(text) - keep)

    def _decode(self, ids, final):
        """Text of ids[_read:], decoded after the token(s) before them; None while it ends mid-character."""
        if len(ids) <= self._read:
            return ""
        def decode(part):
            return self.tok.decode(part, skip_special_tokens=True)
        before = decode(ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = decode(ids[self._prefix:])
        # An unfinished character decodes to U+FFFD; wait for its other bytes (a few tokens at most: past
        # that, the bytes are invalid for good and the replacement character is the text).
        if after.endswith("\ufffd") and not final and len(ids) - self._read < 8:
            return None
        if not after.startswith(before):  # the tokenizer rewrote the context (rare): decode the window whole
            before = ""
            after = after if not self._read else decode(ids[self._read:])
        self._prefix, self._read = self._read, len(ids)
        return after[len(before):]

    def _partial_tail(self, text):
        """Length of the longest end of `text` that is the beginning of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto):
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    @property
    def answer(self) -> str:
        return self.text[:self.sent]


@dataclass
class Request:
    """One answer to generate. The engine fills tokens, text and finish_reason."""
    prompt_ids: list
    adapter: Optional[str] = None  # None = the base model
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: list = field(default_factory=list)
    stop_strings: list = field(default_factory=list)
    cancel: Optional[threading.Event] = None
    logprobs: Optional[int] = None  # record each token's log-probability and this many best alternatives
    on_text: Optional[Callable[[str], None]] = None  # called with each new piece of text
    on_done: Optional[Callable[[Request], None]] = None  # called once, when finish_reason is set
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)  # per token (its logprob, [(id, logprob) best first])
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    error: Optional[str] = None
    started: float = 0.0
    first_token_s: Optional[float] = None
    seconds: float = 0.0
    _stream: Optional[TextStream] = None
    _generator: Optional[torch.Generator] = None

    @property
    def text(self) -> str:
        return self._stream.answer if self._stream else ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Steps one batch of Requests on a loaded model (see generate.load)."""

    def __init__(self, loaded, own_tokenizer: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        # A server encodes prompts on its event loop while this engine decodes on its own thread; a fast
        # tokenizer is not safe to share across threads ("Already borrowed"), so that engine keeps a copy.
        self.tok = copy.deepcopy(loaded.tokenizer) if own_tokenizer else loaded.tokenizer
        self.device = loaded.device
        self.rows: list[Request] = []
        self.cache = None
        self.mask = None  # (B, L) 1 where the cache holds a real token
        self.next_ids = None  # (B,) last sampled token, not yet fed to the model
        self.peft = bool(getattr(loaded, "adapters", None))
        if not hasattr(self.model, "_phitune_top"):  # one hook per model, shared by its engines
            self.model._phitune_top = TopLogits(self.model)
        self.top = self.model._phitune_top

    # ------------------------------------------------------------------ public
    def run(self, requests: list, batch_size: int = 16) -> list:
        """Generate every request (continuous batching: a finished row's place goes to the next request).

        Requests of every model share batches, taken shortest prompt first (less padding, and short
        answers leave room early)."""
        pending = sorted(requests, key=lambda r: len(r.prompt_ids))
        while pending or self.rows:
            room = batch_size - len(self.rows)
            if room > 0 and pending:
                joining = self.joinable(pending, room)
                taken = {id(r) for r in joining}
                pending = [r for r in pending if id(r) not in taken]
                self.add(joining)
            self.step()
        return requests

    @property
    def mixes_models(self) -> bool:
        """Rows of different models may share a batch (stacked adapters). False where only PEFT's own
        one-adapter-at-a-time paths can run the adapters (modules_to_save, DoRA, LoRA biases...)."""
        return not self.peft or self._rows() is not None

    def joinable(self, waiting: Sequence[Request], room: int, fair: bool = False) -> list:
        """The first `room` of `waiting` that may join the running batch now: any of them where models
        share batches, else only those of the running model (of the first waiting one when idle).

        fair (a server, `waiting` oldest first): when the oldest waiting request cannot join, nothing joins,
        so the batch drains and that request's model gets the next batch; otherwise later requests of the
        running model could keep it waiting for ever."""
        if self.mixes_models:
            return list(waiting[:room])
        model = self.rows[0].adapter if self.rows else waiting[0].adapter if waiting else None
        if fair and waiting and waiting[0].adapter != model:
            return []
        return [r for r in waiting if r.adapter == model][:room]

    @torch.no_grad()
    def add(self, requests: list) -> None:
        """Prefill new requests (left-padded among themselves) and join them to the running batch. When the
        prefill fails it raises, and the running batch is as it was."""
        requests = [r for r in requests if not self._cancelled(r)]
        if not requests:
            return
        from transformers import DynamicCache
        now = time.perf_counter()
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            n = len(r.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
            r.started = r.started or now
            r._stream = TextStream(self.tok, r.stop_strings)
            if not r.sampling.greedy:
                r._generator = torch.Generator()
                if r.sampling.seed is None:
                    r._generator.seed()  # fresh entropy, without reseeding the global generator
                else:
                    r._generator.manual_seed(r.sampling.seed)
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in requests])
        self._join(requests, cache, mask)
        self._accept(requests, logits, offset=len(self.rows) - len(requests))

    @torch.no_grad()
    def step(self) -> None:
        """Feed each row its last token, sample the next one, retire finished rows."""
        self._retire()
        if not self.rows:
            return
        ones = torch.ones((len(self.rows), 1), dtype=torch.long)
        positions = self.mask.sum(-1, keepdim=True)  # (B, 1): real tokens so far = the next position
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = self._forward(self.next_ids[:, None], self.mask, positions, self.cache,
                               [r.adapter for r in self.rows])
        self._accept(self.rows, logits, offset=0)
        self._retire()

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids, mask, positions, cache, adapters):
        """(B, vocab) logits of the last position, each row with its own adapter (rows.py)."""
        d = self.device
        kwargs = dict(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d),
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        starts = (mask.shape[1] - mask.sum(-1)).tolist()  # left padding of each row
        exact = self._rows()
        with rows.batch(starts, adapters if self.peft else None, exact.min_rows if exact else 1):
            if exact is not None:
                exact.install()
                model = self.model.get_base_model() if self.peft else self.model
                return model(**kwargs).logits[:, -1].float()
            if not self.peft:
                return self.model(**kwargs).logits[:, -1].float()
            return self._peft_forward(kwargs, adapters)

    def _peft_forward(self, kwargs, adapters):
        """Adapters RowLora cannot stack (DoRA, LoRA biases, embeddings): PEFT's own paths."""
        names = set(adapters)
        if names == {None}:
            with self.model.disable_adapter():
                return self.model(**kwargs).logits[:, -1].float()
        if len(names) == 1:
            self.model.set_adapter(adapters[0])
            return self.model(**kwargs).logits[:, -1].float()
        return self.model(**kwargs, adapter_names=[BASE if a is None else a for a in adapters]).logits[:, -1].float()

    def _rows(self):
        """Row-exact layers with stacked adapters (rows.RowLora), built once per model; None for chat's one
        conversation (nothing shares its batches) and for adapters it cannot stack."""
        if getattr(self.loaded, "alone", False):
            return None
        if not hasattr(self.model, "_phitune_rows"):
            self.model._phitune_rows = RowLora(self.model, list(self.loaded.adapters)) \
                if not self.peft or RowLora.supports(self.model) else None
        return self.model._phitune_rows

    def release(self) -> None:
        """Give the model back its PEFT layers (set_adapter / disable_adapter work again), e.g. to compute a loss."""
        lora = getattr(self.model, "_phitune_rows", None)
        if lora is not None:
            lora.remove()

    # ------------------------------------------------------------------ batch bookkeeping
    def _join(self, requests, cache, mask):
        new_ids = torch.zeros(len(requests), dtype=torch.long)
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_ids = list(requests), cache, mask, new_ids
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width - old), _pad_left(theirs.keys, width - new)])
            mine.values = torch.cat([_pad_left(mine.values, width - old), _pad_left(theirs.values, width - new)])
        self.mask = torch.cat([_pad_left(self.mask, width - old, dim=1), _pad_left(mask, width - new, dim=1)])
        self.rows += requests
        self.next_ids = torch.cat([self.next_ids, new_ids])

    def retire(self) -> None:
        """Drop finished and cancelled rows from the batch now."""
        self._retire()

    def _retire(self):
        keep = [i for i, r in enumerate(self.rows) if not (r.done or self._cancelled(r))]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_ids = [], None, None, None
            self.release()  # between batches the model is PEFT's again: model(...) and set_adapter as usual
            return
        index = torch.tensor(keep)
        self.mask = self.mask[index]
        start = int(self.mask.any(0).long().argmax())  # columns that are padding in every row left go
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self.rows = [self.rows[i] for i in keep]
        self.next_ids = self.next_ids[index]

    def _cancelled(self, r):
        if r.finish_reason is None and r.cancel is not None and r.cancel.is_set():
            _finish(r, "cancelled")
        return r.finish_reason == "cancelled"

    def fail(self, error: str, also: tuple | list = ()) -> None:
        """End every row in flight (and `also`) with an error and empty the batch; the model is untouched."""
        for r in [*self.rows, *also]:
            end_with_error(r, error)
        self.rows, self.cache, self.mask, self.next_ids = [], None, None, None
        self.release()

    def _accept(self, rows, logits, offset):
        """Choose each row's next token from its logits; record text, stops and limits. A row whose turn
        fails (its sampling, its client's callback) ends with the error alone; the others go on."""
        try:
            logits = self.top.refine(logits)
            chosen = logits.argmax(-1).cpu()
        except Exception as e:  # nothing to tell the rows apart by: all of these end
            for r in rows:
                end_with_error(r, e)
            return
        now = time.perf_counter()
        for i, r in enumerate(rows):
            try:
                self._advance(r, logits[i], chosen[i], offset + i, now)
            except Exception as e:
                end_with_error(r, e)

    def _advance(self, r, logits, chosen, index, now):
        s = r.sampling
        if s.repetition_penalty != 1.0 or not s.greedy:
            chosen = _sample(logits, r, s)
        token = int(chosen)
        self.next_ids[index] = token
        if r.logprobs is not None:  # before on_text: a piece's tokens have their logprobs when it is sent
            r.token_logprobs.append(_logprobs(logits, token, r.logprobs))
        r.tokens.append(token)
        if r.first_token_s is None:
            r.first_token_s = now - r.started
        stop_token = token in r.stop_ids
        ids = r.tokens[:-1] if stop_token else r.tokens
        full = stop_token or len(r.tokens) >= s.max_new_tokens
        piece = r._stream.push(ids, final=full)
        if piece and r.on_text:
            r.on_text(piece)
        if r._stream.hit or stop_token:
            _finish(r, "stop", now)
        elif full:
            _finish(r, "length", now)


def end_with_error(r: Request, error) -> None:
    """End one request (in the batch or not) with an error; a batch drops it at its next step."""
    if not r.done:
        r.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        _finish(r, "error")


def _finish(r, reason, now=None):
    r.finish_reason = reason
    r.seconds = (now or time.perf_counter()) - r.started if r.started else 0.0
    if r.on_done:
        try:
            r.on_done(r)
        except Exception:  # a client that is gone cannot be told; its row ends all the same
            pass


def _logprobs(logits, token, k):
    """The model's log-probability of `token` (before temperature and penalties) and the k best (id, logprob)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, k) if k else None
    return float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist())) if k else []


def _pad_left(t, n, dim=2):
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _sample(logits, r, s):
    """One row's token under repetition penalty, temperature, top-k and top-p (as transformers orders them)."""
    logits = logits.float().clone()
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.tokens)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
    if s.greedy:
        return logits.argmax()
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if s.top_p < 1.0:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], -1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set whose mass reaches top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, -1).cpu()
    if not torch.isfinite(probs).all():
        raise ValueError(f"sampling at temperature {s.temperature} gave no usable probabilities")
    return torch.multinomial(probs, 1, generator=r._generator)[0]
