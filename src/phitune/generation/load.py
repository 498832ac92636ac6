"""Generation shared by chat, compare, eval and serve: load base + adapters, then decode with the engine.

Each model (the base and every adapter) is prompted with its own template: an adapter with the format,
system prompt, chat template and stop tokens recorded when it was trained; the base with its tokenizer's
own chat template (or Phi-2's format). Decoding stops at that model's end-of-turn/EOS tokens.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from phitune.data.templates import Template
from phitune.errors import PhituneError
from phitune.generation import rows
from phitune.generation.engine import Engine, Request, Sampling
from phitune.models import adapters
from phitune.models import loading as models

__all__ = ["Sampling", "Answer", "Loaded", "load", "generate", "generate_jobs", "stream", "stream_ids",
           "ContextOverflow"]


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float
    stopped: bool  # ended on a stop token or stop string, not on the token limit
    finish_reason: str = "stop"  # stop | length | cancelled
    first_token_s: Optional[float] = None


@dataclass
class Loaded:
    """A base model in memory with zero or more adapters attached by name, and each one's template."""
    model: torch.nn.Module
    tokenizer: object
    templates: dict  # None (the base) or adapter name -> Template
    adapters: dict  # name -> adapter dir
    metas: dict  # name -> phitune.json contents
    device: torch.device
    base_name: str
    alone: bool = False  # one conversation with one model at a time (chat): rows never share a batch
    _engine: Optional[Engine] = None

    @property
    def first_adapter(self) -> Optional[str]:
        """Name of the first adapter given, or None (the base) when there is none."""
        return next(iter(self.adapters), None)

    @property
    def template(self) -> Template:
        """The template of the first adapter (the base's when there is none)."""
        return self.template_for(self.first_adapter)

    def template_for(self, name: Optional[str]) -> Template:
        """Template of adapter `name`; None or "base" for the base model."""
        return self.templates[None if name in (None, "base") else name]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self)
        return self._engine

    @property
    def context(self) -> Optional[int]:
        """The longest prompt + answer the model takes, in tokens (None when its config does not say)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """How many of max_new_tokens fit after a prompt of prompt_tokens (0 or less: the prompt fills the
        context); a model decoding past its context answers nonsense or fails."""
        return max_new_tokens if self.context is None else min(max_new_tokens, self.context - prompt_tokens)

    def use(self, name: Optional[str]) -> AbstractContextManager:
        """Context for running the model as adapter `name`, or as the plain base for None."""
        self.engine.release()
        if name is None:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        self.model.set_adapter(name)
        return nullcontext()

    def request(self, prompt_ids: Sequence[int], adapter: Optional[str] = None, sampling: Optional[Sampling] = None,
                stop_strings: Sequence[str] = (), **extra) -> Request:
        """An engine Request with this model's stop tokens and stop strings (plus `stop_strings`)."""
        template = self.template_for(adapter)
        fields = dict(adapter=None if adapter in (None, "base") else adapter, sampling=sampling or Sampling(),
                      stop_ids=template.stop_token_ids(), stop_strings=_stop_strings(template) + list(stop_strings))
        return Request(list(prompt_ids), **{**fields, **extra})


def load(adapter_paths: Sequence[str] = (), model: Optional[str] = None, system_prompt: Optional[str] = None,
         trust_remote_code: bool = False, precision: str = "auto", merge: bool = False) -> Loaded:
    """Load one base model and attach each adapter under its own name (its directory's, or NAME=path).

    The base model comes from --model, else from the first adapter's record. `merge=True` (one adapter,
    used alone for the whole session, as in chat) folds it into the weights once, so each token costs
    what the base model costs.
    """
    metas = {}
    names = {}
    for item in adapter_paths:
        name, path = _named(str(item))
        if name == "base":  # the base model's own name on the page, in compare and on the API
            raise models.PhituneError(f"adapter 'base' ({path}): that name is the base model's; name the adapter "
                                      f"yourself with name=DIR, e.g. --adapter_path base-tuned={path}")
        meta = adapters.read_adapter_meta(path)
        name = _unique(name, names)
        names[name], metas[name] = str(path), meta
    base_name = model or next((m.get("base", {}).get("model") for m in metas.values() if m.get("base")), None)
    if base_name is None and adapter_paths:
        base_name = _peft_base(adapter_paths[0])
    if base_name is None:
        base_name = "microsoft/phi-2"
    device = models.pick_device()
    config = models.load_config(base_name, trust_remote_code)
    int8 = precision == "int8"
    if int8 and device.type != "cpu":
        raise models.PhituneError(f"precision: int8 is a CPU decoding path; on {device.type} use bf16 or fp32")
    dtype = models.inference_dtype(device, "bf16" if int8 else precision, config.model_type)
    tokenizer = models.load_tokenizer(base_name, trust_remote_code)
    templates = {None: Template(tokenizer, "auto", system_prompt)}
    for name, meta in metas.items():
        templates[name] = (Template.from_meta(tokenizer, meta["template"], system_prompt) if meta.get("template")
                           else Template(tokenizer, "auto", system_prompt))
    # Adapters are attached (and merged) in fp32, then everything is cast once to the inference dtype.
    net = models.load_model(base_name, torch.float32, trust_remote_code)
    for name, path in names.items():
        net = adapters.load_adapter(net, path, metas[name], adapter_name=name)
    if merge and len(names) == 1:
        net = net.merge_and_unload()
        names = {}
    net = net.to(device=device, dtype=dtype).eval()
    if int8:
        from phitune.generation.int8 import quantize
        quantize(net, dtype)
    elif device.type == "cpu":
        from phitune.generation.packed import pack
        pack(net)
    rows.install_attention(net)
    loaded = Loaded(net, tokenizer, templates, names, metas, device, base_name, alone=merge)
    if merge and metas:
        only = next(iter(metas))
        loaded.templates = {None: templates[only], only: templates[only]}  # the merged model answers as the adapter
    return loaded


def _named(item):
    """'name=path' or 'path'; a path's name is its directory (or its run's, for .../final_adapter)."""
    if "=" in item and not Path(item).exists():
        name, path = item.split("=", 1)
        if name and path:
            return name, path
    p = Path(item).resolve()
    return (p.parent.name if p.name == "final_adapter" else p.name), item


def _unique(name, taken):
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


def _peft_base(path):
    import json
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path")


def _stop_strings(template) -> list:
    # Phi-2 style prompts invite the model to write the next "Instruct:" itself; cut there.
    return ["\nInstruct:"] if template.kind == "phi2" else []


def _answer(r: Request) -> Answer:
    return Answer(r.text.strip(), len(r.tokens), r.seconds, r.finish_reason == "stop", r.finish_reason,
                  r.first_token_s)


def generate(loaded: Loaded, conversations: list, sampling: Sampling = Sampling(), adapter: Optional[str] = None,
             batch_size: int = 16) -> list:
    """Answer each conversation (a list of messages ending with a user turn) with one model."""
    return generate_jobs(loaded, [(conv, adapter, sampling) for conv in conversations], batch_size)


def generate_jobs(loaded: Loaded, jobs: list, batch_size: int = 16) -> list:
    """Answer (conversation, adapter, sampling) jobs; rows of different models share the same batches.

    A job whose prompt + max_new_tokens passes the model's context raises ContextOverflow naming it
    (its index in `jobs`) and the numbers, before anything is generated."""
    encoded = [loaded.template_for(adapter).encode_prompt(conv) for conv, adapter, _ in jobs]
    for i, (ids, (_, _, sampling)) in enumerate(zip(encoded, jobs)):
        if loaded.room(len(ids), sampling.max_new_tokens) < sampling.max_new_tokens:
            raise ContextOverflow(i, len(ids), sampling.max_new_tokens, loaded.context)
    requests = [loaded.request(ids, adapter, sampling) for ids, (_, adapter, sampling) in zip(encoded, jobs)]
    return [_answer(r) for r in _run(loaded, requests, batch_size)]


class ContextOverflow(PhituneError):
    """A prompt plus its max_new_tokens does not fit in the model's context."""

    def __init__(self, index: int, prompt_tokens: int, max_new_tokens: int, context: int):
        self.index, self.prompt_tokens, self.max_new_tokens, self.context = (index, prompt_tokens, max_new_tokens,
                                                                             context)
        super().__init__(f"the prompt is {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that passes "
                         f"the model's context of {context} tokens")


def generate_ids(loaded: Loaded, encoded: list, sampling: Sampling = Sampling(), adapter: Optional[str] = None,
                 batch_size: int = 16) -> list:
    """Continue each prompt given as token ids."""
    return [_answer(r) for r in _run(loaded, [loaded.request(ids, adapter, sampling) for ids in encoded], batch_size)]


def _run(loaded, requests, batch_size):
    return loaded.engine.run(requests, batch_size)


def stream(loaded: Loaded, conversation: list, sampling: Sampling = Sampling(), adapter: Optional[str] = None,
           cancel: Optional[threading.Event] = None) -> Iterator[str]:
    """Yield text pieces of one answer as they are generated; `cancel` (threading.Event) stops it."""
    return stream_ids(loaded, loaded.template_for(adapter).encode_prompt(conversation), sampling, adapter, cancel)


def stream_ids(loaded: Loaded, prompt_ids: list, sampling: Sampling = Sampling(), adapter: Optional[str] = None,
               cancel: Optional[threading.Event] = None) -> Iterator[str]:
    """Like stream(), for a prompt given as token ids. Runs in the caller's thread: Ctrl-C stops it."""
    pieces = []
    req = loaded.request(prompt_ids, adapter, sampling, cancel=cancel or threading.Event(), on_text=pieces.append)
    engine = loaded.engine
    try:
        engine.add([req])
        while True:
            yield from pieces
            pieces.clear()
            if req.done:
                break
            engine.step()
    finally:  # also when the caller stops early (Ctrl-C, a closed generator): the row leaves the batch
        if not req.done:
            req.cancel.set()
            engine.retire()
