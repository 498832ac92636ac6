"""Generation shared by chat, compare, eval and serve: load base + adapters, batched and streaming decode.

Prompts are rendered by the adapter's recorded template, so a tuned model is asked in exactly the
format it was trained on, and decoding stops at the recorded end-of-turn/EOS tokens.
"""
import threading
from contextlib import nullcontext
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from phitune import adapters, models
from phitune.errors import PhituneError
from phitune.templates import Template


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = None

    def generate_kwargs(self):
        if self.temperature and self.temperature > 0:
            kw = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        return dict(max_new_tokens=self.max_new_tokens, **kw)


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float
    stopped: bool  # ended on a stop token/string rather than the token limit


@dataclass
class Loaded:
    """A base model in memory with zero or more adapters attached by name."""
    model: torch.nn.Module
    tokenizer: object
    template: Template
    adapters: dict  # name -> adapter dir
    metas: dict  # name -> phitune.json contents
    device: torch.device
    autocast_dtype: object
    base_name: str

    @property
    def first_adapter(self):
        """Name of the first adapter given, or None (the base) when there is none."""
        return next(iter(self.adapters), None)

    def use(self, name):
        """Context for generating with adapter `name`, or with the plain base for name None."""
        if name is None:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        self.model.set_adapter(name)
        return nullcontext()


def load(adapter_paths=(), model=None, system_prompt=None, trust_remote_code=False, precision="auto"):
    """Load one base model and attach each adapter under its own name (a, b, ...: its directory name).

    The base model comes from --model, else from the first adapter's record.
    """
    metas = {}
    names = {}
    for item in adapter_paths:
        name, path = _named(str(item))
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
    weights_dtype, autocast_dtype = models.precision_plan(device, precision, config.model_type)
    tokenizer = models.load_tokenizer(base_name, trust_remote_code)
    first_meta = next(iter(metas.values()), {})
    if first_meta.get("template"):
        template = Template.from_meta(tokenizer, first_meta["template"], system_prompt)
    else:
        template = Template(tokenizer, "auto", system_prompt)
    base = models.load_model(base_name, weights_dtype, trust_remote_code).to(device).eval()
    net = base
    for name, path in names.items():
        net = adapters.load_adapter(net, path, metas[name], adapter_name=name)
    net.eval()
    return Loaded(net, tokenizer, template, names, metas, device, autocast_dtype, base_name)


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


def _stop_strings(template):
    # Phi-2 style prompts invite the model to write the next "Instruct:" itself; cut there.
    return ["\nInstruct:"] if template.kind == "phi2" else None


def _clean(text, template):
    for stop in _stop_strings(template) or []:
        text = text.split(stop, 1)[0]
    return text.strip()


def generate(loaded, conversations, sampling=Sampling(), adapter=None, batch_size=16):
    """Answer each conversation (a list of messages ending with a user turn). Left-padded batches."""
    encoded = [loaded.template.encode_prompt(conv) for conv in conversations]
    return generate_ids(loaded, encoded, sampling, adapter, batch_size)


@torch.no_grad()
def generate_ids(loaded, encoded, sampling=Sampling(), adapter=None, batch_size=16):
    """Continue each prompt (a list of token ids), in left-padded batches of similar length."""
    tok, template = loaded.tokenizer, loaded.template
    results = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    stop_ids = template.stop_token_ids()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with loaded.use(adapter), models.autocast(loaded.device, loaded.autocast_dtype):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            began = time.perf_counter()
            out = loaded.model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                        eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                                        stop_strings=_stop_strings(template), tokenizer=tok,
                                        **sampling.generate_kwargs())
            seconds = time.perf_counter() - began
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                n, stopped = len(new), False
                for pos, t in enumerate(new):
                    if t in stop_ids:
                        n, stopped = pos + 1, True
                        break
                text = tok.decode(new[:n], skip_special_tokens=True)
                stopped = stopped or text != _clean(text, template) or n < sampling.max_new_tokens
                results[i] = Answer(_clean(text, template), n, seconds / len(idx), stopped)
    return results


def stream(loaded, conversation, sampling=Sampling(), adapter=None, cancel=None):
    """Yield text pieces of one answer as they are generated; `cancel` (threading.Event) stops it."""
    return stream_ids(loaded, loaded.template.encode_prompt(conversation), sampling, adapter, cancel)


def stream_ids(loaded, prompt_ids, sampling=Sampling(), adapter=None, cancel=None):
    """Like stream(), for a prompt given as token ids."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
    tok, template = loaded.tokenizer, loaded.template
    ids = torch.tensor([list(prompt_ids)], device=loaded.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    cancel = cancel or threading.Event()

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return cancel.is_set()

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    errors = []

    def work():
        try:
            with torch.no_grad(), loaded.use(adapter), models.autocast(loaded.device, loaded.autocast_dtype):
                loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                      eos_token_id=template.stop_token_ids(), pad_token_id=tok.pad_token_id,
                                      stop_strings=_stop_strings(template), tokenizer=tok,
                                      stopping_criteria=StoppingCriteriaList([Cancelled()]),
                                      **sampling.generate_kwargs())
        except Exception as e:  # surfaced in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pending = ""
    stops = _stop_strings(template) or []
    keep = max((len(s) - 1 for s in stops), default=0)  # a tail that may still become a stop string
    try:
        for piece in streamer:
            pending += piece
            hit = next((s for s in stops if s in pending), None)
            if hit:
                yield pending.split(hit, 1)[0]
                pending = ""
                break
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
        if pending:
            yield pending
    finally:  # also runs when the caller stops early (Ctrl-C): end the generation thread cleanly
        cancel.set()
        thread.join()
    if errors:
        raise PhituneError(f"generation failed: {errors[0]}")
