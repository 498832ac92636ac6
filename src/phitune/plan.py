"""`phitune plan`: will a training run fit in memory, and how long will an epoch take? Before starting it.

    phitune plan --model smollm2-135m-instruct --dataset_path data.jsonl --batch_size 8 [any train flag]
    phitune plan ... --measure          # also run two real steps of the longest batch: measured peak and time
    phitune plan --table docs/planning.md   # the Phi-2 / Phi-3.5-mini table for common devices

The estimates come from phitune.hardware.memory (its docstring has the API the training pre-flight uses):
estimate_memory(shape, lora, batch_size, seq_len, checkpointing, weights_dtype, compute_dtype, device,
quantize=None) -> Estimate(total_bytes, parts), fits(estimate, capacity), suggest(...) -> Suggestion(.text).
Time per epoch: the FLOPs of the epoch's real padded batches (data tokenised with the model's template and
grouped by length as training groups them) divided by this device's matmul rate, measured here in a
fraction of a second, times an assumed training efficiency (EFFICIENCY: the share of matmul peak a LoRA
step reaches; measured 19-37% on the development CPU, docs/benchmarks.md). --measure shows the real figure.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from phitune.config import GROUPS as RUN_GROUPS
from phitune.config import RunConfig, add_arguments, build_config
from phitune.config_commands import PlanArgs
from phitune.data import records as data
from phitune.errors import PhituneError
from phitune.hardware import backends
from phitune.hardware.memory import (  # noqa: F401
    GIB,
    device_memory,
    estimate_memory,
    fits,
    flops_per_token,
    model_shape,
    rows_per_example,
    suggest,
)
from phitune.models import loading as models

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from transformers import PretrainedConfig, PreTrainedTokenizerBase

GROUPS = {**RUN_GROUPS, "plan": PlanArgs}
EFFICIENCY = {"cpu": 0.25, "cuda": 0.4, "mps": 0.3}
# The configurations the original Phi-2 README listed by hand: (label, batch, accumulation, max_length,
# gradient checkpointing, quantize).
README_CONFIGS = [
    ("README 8x4 @2048", 8, 4, 2048, True, None),
    ("README 8x4 @2048, no ckpt", 8, 4, 2048, False, None),
    ("README 4x8 @1024", 4, 8, 1024, True, None),
    ("README 4x8 @1024, no ckpt", 4, 8, 1024, False, None),
    ("README 4x8 @1024, 4-bit", 4, 8, 1024, True, "4bit"),
]
# Full-size shapes (DESIGN.md, Architectures), so plans need no download.
KNOWN_CONFIGS = {
    "microsoft/phi-2": ("PhiConfig", dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                                          num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                                          max_position_embeddings=2048, tie_word_embeddings=False)),
    "microsoft/Phi-3.5-mini-instruct": ("Phi3Config", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
        tie_word_embeddings=False)),
}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the training options and the planner's own (--measure, --memory_gib, --table) to the parser p."""
    add_arguments(p, GROUPS)


def load_model_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config. Phi-2 and Phi-3.5-mini: the cached config, else their built-in full-size shapes
    (no network round trip: the shapes are all a plan needs)."""
    if name not in KNOWN_CONFIGS:
        return models.load_config(name, trust_remote_code)
    import transformers
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        cls, kw = KNOWN_CONFIGS[name]
        return getattr(transformers, cls)(**kw)


def _load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if name not in KNOWN_CONFIGS:
        return models.load_tokenizer(name, trust_remote_code)
    from transformers import AutoTokenizer
    try:
        return models.prepare_tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=True))
    except (OSError, ValueError) as e:
        raise PhituneError(f"{name}: tokenizer not in the local cache ({e})") from None


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on this device in `dtype` (median of a few; well under a second)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times)[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def epoch_tokens(lengths: list[int], batch_size: int, seed: int = 0) -> int:
    """Padded tokens an epoch computes: length-grouped batches (as training builds them), each padded to its longest."""
    return sum(len(b) * max(lengths[i] for i in b) for b in data.length_grouped_batches(lengths, batch_size, seed, 0))


def main(args: argparse.Namespace) -> int:
    """Run `phitune plan` with parsed args: print the memory and time estimate (or write --table); exit code."""
    parts = build_config(args, GROUPS)
    own = parts.pop("plan")
    if own.table:
        write_table(own.table)
        print(f"wrote {own.table}", file=sys.stderr)
        return 0
    cfg = RunConfig(**parts)
    if own.measure and not cfg.data.dataset_path:
        raise PhituneError("--measure needs --dataset_path (it trains two steps on the longest batch)")
    if cfg.model.quantize and models.pick_device().type != "cuda":
        raise PhituneError(f"quantize: {cfg.model.quantize} training needs CUDA; plan it on the GPU machine, or see "
                           f"the 4-bit rows of docs/planning.md")
    model_config = load_model_config(cfg.model.model, cfg.model.trust_remote_code)
    shape = model_shape(model_config)
    device = models.pick_device()
    weights_dtype, compute_dtype = models.precision_plan(device, cfg.model.precision, model_config.model_type)
    capacity, where = device_memory(device)
    if own.memory_gib is not None:
        capacity, where = own.memory_gib * GIB, f"{where}; planning for {own.memory_gib:g} GiB"
    lengths, answer_fraction, note, examples, pad_id = _data_lengths(cfg)
    per = rows_per_example(cfg.train.method)  # dpo/orpo: a pair is 2 rows; lengths and examples are rows
    rate = matmul_rate(device, compute_dtype or weights_dtype)
    speed = rate * EFFICIENCY[device.type]
    print(f"phitune plan: {cfg.model.model} ({shape.model_type}, {shape.params / 1e6:.0f}M parameters) on {where}")
    print(f"  precision: weights {str(weights_dtype)[6:]}, compute {str(compute_dtype or weights_dtype)[6:]}; "
          f"matmul {rate / 1e9:,.0f} GFLOP/s measured, time assumes {EFFICIENCY[device.type]:.0%} of it")
    print(f"  data: {note}")
    t = cfg.train
    longest = min(cfg.data.max_length, max(lengths)) if lengths else cfg.data.max_length
    need = estimate_memory(shape, cfg.lora, t.batch_size, longest, False, weights_dtype, compute_dtype, device.type,
                           cfg.model.quantize, answer_fraction=answer_fraction, rows_per_example=per).total_bytes
    ckpt_this_run, reason = backends.decide_checkpointing(t.gradient_checkpointing, need, capacity)
    print(f"  gradient checkpointing {reason}")
    rows = [("this run", t.batch_size, t.gradient_accumulation_steps, cfg.data.max_length,
             ckpt_this_run, cfg.model.quantize)] + README_CONFIGS
    header = f"  {'configuration':28} {'batch':>6} {'tokens':>6} {'ckpt':>4} {'weights':>8} {'LoRA+Adam':>9} " \
             f"{'activ.':>7} {'total':>7}  {'fits':4} {'epoch':>9}"
    print("\n" + header + "\n  " + "-" * (len(header) - 2))
    first = None
    for label, bs, acc, max_len, ckpt, quant in rows:
        if quant and device.type != "cuda":
            print(f"  {label:28} (4-bit needs CUDA and bitsandbytes)")
            continue
        seq = min(max_len, max(lengths)) if lengths else max_len
        rows_in_batch = min(bs, len(lengths) // per) if lengths else bs  # a batch cannot hold more than the data
        est = estimate_memory(shape, cfg.lora, rows_in_batch, seq, ckpt, weights_dtype, compute_dtype, device.type,
                              quant, answer_fraction=answer_fraction, rows_per_example=per)
        first = first or est
        ok = fits(est, capacity)
        if lengths:
            clipped = [min(n, max_len) for n in lengths]
            mean = sum(clipped) / len(clipped)
            flops = flops_per_token(shape, est.trainable, mean, ckpt, answer_fraction) * epoch_tokens(clipped,
                                                                                                     bs * per)
            epoch = _duration(flops / speed)
        else:
            epoch = "-"
        act = sum(v for k, v in est.parts.items() if k not in ("weights", "lora + AdamW"))
        print(f"  {label:28} {f'{bs}x{acc}':>6} {seq:>6} {'on' if ckpt else 'off':>4} "
              f"{est.parts['weights'] / GIB:7.2f}G {est.parts['lora + AdamW'] / GIB:8.2f}G {act / GIB:6.2f}G "
              f"{est.total_gib:6.2f}G{'*' if est.loading_dominates else ' '} {'yes' if ok else 'NO':4} {epoch:>9}")
    if first.loading_dominates:
        print(f"\n  * peak while loading: every weight in {str(weights_dtype)[6:]} "
              f"({first.loading / GIB:.2f} GiB with the LoRA weights) before the LoRA layers' frozen weights are "
              f"cast to {str(compute_dtype)[6:]}; the training step needs less")
    if not fits(first, capacity):
        s = suggest(shape, cfg.lora, first.batch_size, t.gradient_accumulation_steps, first.seq_len,
                    ckpt_this_run, capacity, weights_dtype=weights_dtype, compute_dtype=compute_dtype,
                    device=device.type, quantize=cfg.model.quantize, answer_fraction=answer_fraction,
                    rows_per_example=per)
        print("\n  this run does not fit: " + (s.text if s else "not even one example per micro-batch with "
                                               "checkpointing; lower --max_length or use --quantize 4bit (CUDA)"))
    if own.measure:
        if not examples:
            raise PhituneError(f"--measure needs the model's tokenizer, which is not available here for "
                               f"{cfg.model.model}")
        m = measure(cfg, examples, pad_id, ckpt_this_run, rows=cfg.train.batch_size * per)
        err = (first.total_bytes - m["peak_bytes"]) / m["peak_bytes"]
        flops = flops_per_token(shape, first.trainable, m["seq_len"], ckpt_this_run,
                                answer_fraction) * m["tokens"]
        print(f"\n  measured ({m['how']}), 2 steps of the longest batch ({m['rows']} x {m['seq_len']} tokens):\n"
              f"    peak {_size(m['peak_bytes'])} vs estimated {_size(first.total_bytes)} ({err:+.0%})\n"
              f"    step {m['step_s']:.2f} s vs estimated {flops / speed:.2f} s "
              f"({flops / m['step_s'] / rate:.0%} of the measured matmul rate)")
    return 0


def _pair_lengths(cfg):
    """_data_lengths for dpo/orpo: preference pairs, each counted as its two sequences (rows)."""
    from phitune.data import pairs
    from phitune.data.templates import Template
    records, fmt = pairs.read_pairs(cfg.data.dataset_path, cfg.data.dataset_split, cfg.data.columns)
    tok = _load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    examples, stats = pairs.encode_pairs(records, Template(tok, cfg.data.template, cfg.data.system_prompt), 10 ** 9)
    rows = [e[key] for e in examples for key in ("chosen", "rejected")]
    lengths = [len(r["input_ids"]) for r in rows]
    answer_fraction = stats.answer_tokens / max(1, stats.tokens)
    over = sum(n > cfg.data.max_length for n in lengths)
    note = (f"{len(examples):,} {fmt} pairs ({len(rows):,} sequences: a batch of B pairs is 2B rows), "
            f"{stats.tokens:,} tokens ({answer_fraction:.0%} in answers), longest {max(lengths)}"
            + (f"; {over} longer than --max_length {cfg.data.max_length}" if over else ""))
    for r in rows:  # as training will see them
        r["input_ids"], r["labels"] = r["input_ids"][:cfg.data.max_length], r["labels"][:cfg.data.max_length]
    return lengths, answer_fraction, note, rows, tok.pad_token_id


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _data_lengths(cfg):
    """(token lengths, share of positions trained, a note, encoded examples, pad id) of the training data."""
    if not cfg.data.dataset_path:
        return None, 1.0, f"none given: every example taken as --max_length {cfg.data.max_length} tokens", None, None
    if cfg.train.method != "sft":
        return _pair_lengths(cfg)
    records, fmt = data.read_records(cfg.data.dataset_path, cfg.data.dataset_split, cfg.data.columns)
    try:
        from phitune.data.templates import Template
        tok = _load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    except PhituneError:  # offline with a hub id: characters / 4 is a usual English tokens-per-character ratio
        lengths = [max(1, sum(len(m["content"]) for m in r.get("messages", [])) // 4 + len(r.get("text", "")) // 4)
                   for r in records]
        return lengths, 0.5, (f"{len(records):,} {fmt} records; tokenizer not available here, lengths guessed "
                              f"as characters / 4 (longest ~{max(lengths)})"), None, None
    template = Template(tok, cfg.data.template, cfg.data.system_prompt)
    examples, stats = data.encode_records(records, template, 10 ** 9, cfg.data.train_on_prompt)
    lengths = [len(e["input_ids"]) for e in examples]
    answer_fraction = stats.answer_tokens / max(1, stats.tokens)
    over = sum(n > cfg.data.max_length for n in lengths)
    note = (f"{len(examples):,} {fmt} examples, {stats.tokens:,} tokens ({answer_fraction:.0%} trained), longest "
            f"{max(lengths)}" + (f"; {over} longer than --max_length {cfg.data.max_length}" if over else ""))
    for e in examples:  # as training will see them
        e["input_ids"], e["labels"] = e["input_ids"][:cfg.data.max_length], e["labels"][:cfg.data.max_length]
    return lengths, answer_fraction, note, examples, tok.pad_token_id


def measure(cfg: RunConfig, examples: list[dict[str, list[int]]], pad_id: int, checkpointing: bool,
            steps: int = 2, rows: int | None = None) -> dict[str, Any]:
    """Load the model and run two real training steps on the longest batch (`rows` rows, default --batch_size; a
    dpo/orpo batch of B pairs is measured as its 2B longest sequences), set up as `phitune train` sets it up.

    Returns {"peak_bytes", "step_s", "seq_len", "rows", "tokens", "how"}: on CUDA the allocator's peak; on CPU
    the process's peak anonymous resident memory over loading and the steps (see _PeakMemory)."""
    from phitune.models import adapters
    from phitune.training.loss import AnswerLoss
    from phitune.training.setup import enable_checkpointing
    device = models.pick_device()
    config = models.load_config(cfg.model.model, cfg.model.trust_remote_code)
    weights_dtype, compute_dtype = models.precision_plan(device, cfg.model.precision, config.model_type)
    quant = models.quantization_config(cfg.model.quantize, device)
    longest = sorted(examples, key=lambda e: -len(e["input_ids"]))[:rows or cfg.train.batch_size]
    batch = {k: v.to(device) for k, v in data.collate(longest, pad_id).items()}
    seq_len = batch["input_ids"].shape[1]
    times = []
    with _PeakMemory(device) as peak:
        model = models.load_model(cfg.model.model, weights_dtype, cfg.model.trust_remote_code, quant,
                                  random_weights_ok=True)
        if quant is None:
            model = model.to(device)
        model.config.use_cache = False
        model, _ = adapters.attach_lora(model, cfg.lora, seed=cfg.train.seed)
        backends.apply(model, backends.make_plan(device, weights_dtype, compute_dtype, quant is not None, seq_len))
        if checkpointing:
            enable_checkpointing(model)
        loss_model = AnswerLoss(model).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            with models.autocast(device, compute_dtype):
                loss_sum, n = loss_model(**batch)
            (loss_sum / n.clamp(min=1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"peak_bytes": peak.peak, "step_s": times[-1], "seq_len": seq_len, "rows": len(longest),
            "tokens": int(batch["input_ids"].numel()), "how": peak.how}


class _PeakMemory:
    """Peak memory of the code inside `with` (loading and the steps): CUDA's max_memory_allocated, or on CPU
    the process's peak resident memory of its own: anonymous memory plus the resident pages of weight files
    it maps, sampled every few milliseconds. That takes in the Python runtime and the moment the weights are
    loaded in their master dtype, before the LoRA layers' frozen weights are cast down. Weights read straight
    from a file of the same dtype stay mapped from it (an fp32 checkpoint trained in fp32): every step reads
    them, so they count. Shared libraries and other mapped files are left out."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        self.how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
            "peak resident memory of the process, its mapped weight files included, loading included"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        import threading
        self.weights = _mapped_weights_rss()
        self.start = _anon_rss() + self.weights
        self.stop, self.sampled = threading.Event(), self.start
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        # the mapped weight pages change only while loading and cost a walk of /proc/self/smaps: every 0.1 s
        tick = 0
        while not self.stop.wait(0.003):
            tick += 1
            if tick % 33 == 0:
                self.weights = _mapped_weights_rss()
            self.sampled = max(self.sampled, _anon_rss() + self.weights)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
            return False
        self.stop.set()
        self.thread.join()
        self.peak = max(self.sampled, _anon_rss() + _mapped_weights_rss())
        return False


def _anon_rss():
    """Resident anonymous memory of this process (Linux: RssAnon); elsewhere the whole resident set."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.Process().memory_info().rss


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _mapped_weights_rss():
    """Resident bytes of the weight files this process maps (Linux /proc/self/smaps); 0 elsewhere."""
    total, counting = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header: address range ... path
                    counting = line.rstrip().endswith(WEIGHT_FILES)
                elif counting and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


# ---------------------------------------------------------------- the docs table

START, END = "<!-- phitune plan --table: start -->", "<!-- phitune plan --table: end -->"
GPUS = (16, 24, 40, 80)     # GiB of common CUDA cards
MACS = (18, 36, 64)         # GiB of unified memory; MPS may use about 3/4 of it


def table_markdown() -> str:
    """Markdown table of estimated peaks for full-size Phi-2 and Phi-3.5-mini in the README configurations."""
    import transformers

    from phitune.config import LoraArgs
    lora = LoraArgs()
    bf16, fp32 = torch.bfloat16, torch.float32
    lines = [f"| model | configuration | CUDA bf16 | fits {' / '.join(f'{g}' for g in GPUS)} GiB GPU | "
             f"MPS fp32 | fits {' / '.join(f'{m}' for m in MACS)} GiB Mac | CPU (fp32 + bf16) |",
             "|---|---|---|---|---|---|---|"]
    for name, (cls, kw) in KNOWN_CONFIGS.items():
        shape = model_shape(getattr(transformers, cls)(**kw))
        for _label, bs, acc, seq, ckpt, quant in README_CONFIGS:
            cuda = estimate_memory(shape, lora, bs, seq, ckpt, bf16, bf16, "cuda", quant, answer_fraction=0.5)
            gpu_fit = " / ".join("yes" if fits(cuda, g * GIB) else "no" for g in GPUS)
            flags = f"`--batch_size {bs} --gradient_accumulation_steps {acc} --max_length {seq}" + \
                (" --no_gradient_checkpointing" if not ckpt else "") + (f" --quantize {quant}" if quant else "") + "`"
            if quant:
                lines.append(f"| {name} | {flags} | {cuda.total_gib:.1f} GiB | {gpu_fit} | - | - | - |")
                continue
            mps = estimate_memory(shape, lora, bs, seq, ckpt, fp32, None, "mps", answer_fraction=0.5)
            mac_fit = " / ".join("yes" if fits(mps, 0.75 * m * GIB) else "no" for m in MACS)
            cpu = estimate_memory(shape, lora, bs, seq, ckpt, fp32, bf16, "cpu", answer_fraction=0.5)
            lines.append(f"| {name} | {flags} | {cuda.total_gib:.1f} GiB | {gpu_fit} | {mps.total_gib:.1f} GiB | "
                         f"{mac_fit} | {cpu.total_gib:.1f} GiB |")
    return "\n".join(lines)


def write_table(path: str | Path) -> None:
    """Write the table into `path` between its START/END markers (the whole file when it has none)."""
    from pathlib import Path
    p = Path(path)
    block = (f"{START}\n<!-- generated by `phitune plan --table {path}`; do not edit by hand -->\n\n"
             f"{table_markdown()}\n\n{END}")
    text = p.read_text(encoding="utf-8") if p.is_file() else ""
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    p.write_text(text, encoding="utf-8")
