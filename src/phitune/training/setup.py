"""Before and after the training loop: build a Run from a RunConfig, and write the final adapter.

setup():  data (read, validate, template, tokenise) -> device plan -> model + LoRA (new, or --adapter_path
          trained further) -> pre-flight -> optimizer + schedule -> DPO reference log-probs -> resume state.
          Bad input fails here, before any step runs.
finish(): restore the best validated weights, write final_adapter/ with phitune.json, print the summary.

--method dpo|orpo trains on preference pairs (data/pairs.py, training/preference.py): the batches hold
2 rows per pair, and DPO's reference log-probs are computed once here, before the first step, from the
model as training starts (eval mode, the loop's own forward), and kept in output_dir/reference_logps.pt,
which --resume reads back instead of recomputing them from weights that have trained since.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from tqdm.auto import tqdm

from phitune.config import RunConfig
from phitune.data import pairs as pair_data
from phitune.data import records as data
from phitune.data.templates import Template
from phitune.errors import ConfigError, PhituneError
from phitune.hardware import backends
from phitune.models import adapters
from phitune.models import loading as models
from phitune.training import checkpoints, preference
from phitune.training.loss import AnswerLoss
from phitune.training.report import MetricsLog, summary
from phitune.training.trackers import Trackers

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel


@dataclass
class Progress:
    """Loop state that a checkpoint saves and --resume restores."""
    step: int = 0
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The loop state as saved in a checkpoint's state.json."""
        return dict(vars(self))


@dataclass
class Run:
    """Everything the loop needs, built once by setup()."""
    cfg: RunConfig
    out: Path
    accelerator: Any
    plan: backends.DevicePlan
    tokenizer: Any
    template: Template
    fmt: str
    train_set: list
    val_set: list
    train_stats: Any
    model: Any  # the PEFT model
    loss_model: Any  # AnswerLoss, wrapped by Accelerate
    trainable: list
    n_trainable: int
    targets: list
    optimizer: Any
    scheduler: Any
    steps_per_epoch: int
    total_steps: int
    model_config: Any
    progress: Progress = field(default_factory=Progress)
    metrics: Optional[MetricsLog] = None
    trackers: Any = None  # TensorBoard, wandb, ... (trackers.py): log(row, step), finish()
    objective: Optional[preference.Objective] = None  # dpo/orpo: the preference loss; None for sft
    pair_module: Any = None  # dpo/orpo: the PairLogps module itself (not wrapped), for evaluation passes
    reference: dict = field(default_factory=dict)  # dpo: {"train": (n, 2), "val": (m, 2)} reference log-probs

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The training batch of train_set[indices] (CPU tensors): examples for sft, 2 rows per pair otherwise."""
        pad = self.tokenizer.pad_token_id
        if self.objective is None:
            return data.collate([self.train_set[i] for i in indices], pad)
        ref = self.reference.get("train")
        return pair_data.collate_pairs([self.train_set[i] for i in indices], pad,
                                       ref_logps=None if ref is None else ref[indices],
                                       nll_on_prompt=self.cfg.data.train_on_prompt)

    def lengths(self) -> list[int]:
        """Padded width of each training example (a pair's longer sequence)."""
        if self.objective is None:
            return [len(e["input_ids"]) for e in self.train_set]
        return [pair_data.pair_length(e) for e in self.train_set]

    def record(self, **row: Any) -> None:
        """One metrics row: metrics.jsonl on the main process, and every tracker asked for."""
        if self.metrics:
            self.metrics.add(**row)
            self.trackers.log(self.metrics.rows[-1], row["step"])

    def log(self, *lines: str) -> None:
        """Print lines on the main process only (see say)."""
        say(self.accelerator, *lines)

    @property
    def device(self) -> torch.device:
        """The device the run trains on."""
        return self.plan.device


def say(accelerator: Accelerator, *lines: str) -> None:
    """Log lines on the main process only, without breaking the progress bar."""
    if accelerator.is_main_process:
        for line in lines:
            tqdm.write(line, file=sys.stderr)


def setup(cfg: RunConfig) -> Run:
    """Build a Run: validated data, the model with LoRA on its hardware path, optimizer, schedule, state."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    t, out = cfg.train, Path(cfg.train.output_dir)
    method = t.method
    if method == "dpo" and cfg.data.train_on_prompt:
        raise ConfigError("train_on_prompt", "does not apply to --method dpo, which compares the two answers only "
                                             "(with orpo it adds the prompt to the NLL term)")
    start = _start_adapter(cfg)  # --adapter_path: its meta; cfg.lora becomes its LoRA shape
    # ---- inputs first: a bad line or field fails in seconds, before any weights are loaded
    read = data.read_records if method == "sft" else pair_data.read_pairs
    train_records, fmt = read(cfg.data.dataset_path, cfg.data.dataset_split, cfg.data.columns)
    if cfg.data.val_path:
        val_records, _ = read(cfg.data.val_path, cfg.data.val_dataset_split, cfg.data.columns)
    else:
        train_records, val_records = data.split_validation(train_records, cfg.data.val_split, t.seed)
    model_config = models.load_config(cfg.model.model, cfg.model.trust_remote_code)
    context = getattr(model_config, "max_position_embeddings", None)
    if context and cfg.data.max_length > context:
        raise ConfigError("max_length", f"{cfg.data.max_length} is beyond this model's context of {context} tokens")
    _check_output_dir(out, t.resume)

    accelerator = Accelerator(cpu=models.pick_device().type == "cpu")
    set_seed(t.seed)
    trackers = Trackers.start(cfg, accelerator)  # no-op without --report_to
    device = accelerator.device
    weights_dtype, autocast_dtype = models.precision_plan(device, cfg.model.precision, model_config.model_type)
    quantization = models.quantization_config(cfg.model.quantize, device)

    # ---- tokenise with the template that chat/compare/eval will use too
    tokenizer = models.load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    if start is not None and start.get("template"):  # the adapter's own template, so its answers keep their form
        template = Template.from_meta(tokenizer, start["template"], cfg.data.system_prompt)
    else:
        template = Template(tokenizer, cfg.data.template, cfg.data.system_prompt)
    if method == "sft":
        encode = dict(template=template, max_length=cfg.data.max_length, train_on_prompt=cfg.data.train_on_prompt,
                      long_examples=cfg.data.long_examples)
        train_set, train_stats = data.encode_records(train_records, **encode)
        val_set, val_stats = data.encode_records(val_records, **encode) if val_records else ([], None)
        lengths = [len(e["input_ids"]) for e in train_set]
    else:
        encode = dict(template=template, max_length=cfg.data.max_length, long_examples=cfg.data.long_examples)
        train_set, train_stats = pair_data.encode_pairs(train_records, **encode)
        val_set, val_stats = pair_data.encode_pairs(val_records, **encode) if val_records else ([], None)
        lengths = [pair_data.pair_length(e) for e in train_set]
    if not train_set:
        raise PhituneError(f"{cfg.data.dataset_path}: no example has an answer token within --max_length "
                           f"{cfg.data.max_length}; raise --max_length")
    plan = backends.make_plan(device, weights_dtype, autocast_dtype, quantization is not None, max(lengths))

    # ---- model and adapters, on the plan's hardware path
    model = models.load_model(cfg.model.model, weights_dtype, cfg.model.trust_remote_code, quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    if start is not None:
        model = adapters.load_adapter(model, cfg.model.adapter_path, start, trainable=True)
        targets = [n for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A]
    else:
        model, targets = adapters.attach_lora(model, cfg.lora, seed=t.seed)
    fused = backends.apply(model, plan)
    lines, n_trainable = adapters.trainable_summary(model, targets)
    plan.checkpointing, plan.checkpointing_reason = backends.decide_checkpointing(
        t.gradient_checkpointing, *_memory_without_checkpointing(model_config, cfg, t, max(lengths), plan))
    if plan.checkpointing:
        enable_checkpointing(model)
    if start is not None:
        say(accelerator, f"starting from adapter {cfg.model.adapter_path} (base {cfg.model.model}, template "
                         f"{template.kind}, LoRA r={cfg.lora.lora_r} alpha={cfg.lora.lora_alpha:g} dropout "
                         f"{cfg.lora.lora_dropout:g} on {', '.join(cfg.lora.target_modules)}); trained further "
                         f"with --method {method}")
    say(accelerator, f"data: {fmt} records, template {template.kind} (stops at {', '.join(template.stop_tokens)})",
            train_stats.report("train"), *([val_stats.report("validation")] if val_stats else []),
            f"model: {cfg.model.model} ({models.describe(model.get_base_model())}) on {_as_trained(plan, model)}"
            + (f", {fused} of {len(targets)} LoRA layers on phitune's fused CPU path" if fused else ""),
            *lines, f"gradient checkpointing {plan.checkpointing_reason}")
    if accelerator.is_main_process:
        _preflight(plan, cfg, out, n_trainable, model_config, max(lengths), lambda m: say(accelerator, m))
    objective = preference.Objective(method, t.beta, t.rpo_alpha) if method != "sft" else None
    loss_model = AnswerLoss(model) if objective is None else preference.PairLogps(model)
    pair_module = loss_model if objective is not None else None
    if t.torch_compile:
        for layer in loss_model.decoder.layers:  # regional compilation: one graph per block, compiled once
            layer.compile(dynamic=True)

    # ---- optimizer and schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    n_batches = math.ceil(len(train_set) / t.batch_size)  # batches of examples, or of pairs
    steps_per_epoch = max(1, math.ceil(n_batches / (t.gradient_accumulation_steps * accelerator.num_processes)))
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(t.warmup_ratio * total_steps), total_steps)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    run = Run(cfg, out, accelerator, plan, tokenizer, template, fmt, train_set, val_set, train_stats, model,
              loss_model, trainable, n_trainable, targets, optimizer, scheduler, steps_per_epoch, total_steps,
              model_config, trackers=trackers, objective=objective, pair_module=pair_module)
    ckpt = checkpoints.latest(out) if t.resume else None
    if ckpt is not None:
        _check_same_method(ckpt, t)
    if method == "dpo":  # before a checkpoint is loaded: the reference is the model as training starts
        run.reference = _reference_logps(run, out, t.resume)

    # ---- resume
    if ckpt is not None:
        saved = checkpoints.load(ckpt, model, optimizer, scheduler, rank=accelerator.process_index)
        run.progress = Progress(**{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__})
        run.log(f"resuming from {ckpt} (step {run.progress.step} of {total_steps})")
    elif t.resume:
        run.log(f"no complete checkpoint in {out}; starting from the beginning")
    run.metrics = MetricsLog(out, resume_step=run.progress.step) if accelerator.is_main_process else None
    return run


def finish(run: Run, stop_reason: Optional[str] = None) -> Path:
    """Write final_adapter/: the best validated weights when there was validation, else the last."""
    p, cfg, out = run.progress, run.cfg, run.out
    final = out / "final_adapter"
    if p.best_step is not None and p.best_step != p.step:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        set_peft_model_state_dict(run.model, load_file(out / "best_adapter" / "adapter_model.safetensors"))
    rows = run.metrics.rows if run.metrics else []
    final_metrics = {"steps": p.step, "epochs": round(p.step / run.steps_per_epoch, 3),
                     "train_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
                     "best_val_loss": p.best_val, "best_step": p.best_step, "tokens": p.tokens,
                     "answer_tokens": p.answer_tokens, "seconds": round(p.seconds, 1)}
    if run.objective is not None:
        for key in ("accuracy", "margin"):
            final_metrics[f"train_{key}"] = next((r[key] for r in reversed(rows) if key in r), None)
    if run.accelerator.is_main_process:
        mc = run.model_config
        meta = {"base": {"model": _portable(cfg.model.model), "model_type": mc.model_type,
                         "hidden_size": mc.hidden_size, "num_hidden_layers": mc.num_hidden_layers,
                         "vocab_size": mc.vocab_size},
                "template": run.template.to_meta(),
                "data": {"format": run.fmt, "train_examples": len(run.train_set), "val_examples": len(run.val_set),
                         "max_length": cfg.data.max_length, "train_on_prompt": cfg.data.train_on_prompt,
                         "truncated": run.train_stats.truncated, "dropped": run.train_stats.dropped},
                "lora": {"targets": len(run.targets), "trainable_parameters": run.n_trainable},
                "hardware": {"device": run.plan.device.type, "attention": run.plan.attention,
                             "lora_layer": run.plan.lora_layer, "gradient_checkpointing": run.plan.checkpointing,
                             "gradient_checkpointing_reason": run.plan.checkpointing_reason},
                "method": cfg.train.method, "beta": cfg.train.beta if cfg.train.method != "sft" else None,
                **({"rpo_alpha": cfg.train.rpo_alpha} if cfg.train.rpo_alpha else {}),
                "start_adapter": _portable(cfg.model.adapter_path) if cfg.model.adapter_path else None,
                "selected": "best validation loss" if p.best_step else "last step",
                "stopped": stop_reason, "training": cfg.to_dict(), "metrics": final_metrics}
        checkpoints.atomic_dir(final, lambda d: adapters.save_adapter(run.model, run.tokenizer, d, meta))
        if run.objective is None:
            run.metrics.plot()
        else:
            run.metrics.plot(f"{cfg.train.method.upper()} loss")
        run.trackers.finish()
        _print_summary(final_metrics, final, out, speed=p.tokens / max(p.seconds, 1e-9), method=cfg.train.method)
    run.accelerator.wait_for_everyone()
    return final


def _as_trained(plan, model):
    """The hardware path with the frozen weights' dtypes as held in training (the fused CPU LoRA layers keep
    theirs in bf16 under fp32 master weights), parameter counts per dtype."""
    held = {}
    for p in model.parameters():
        if not p.requires_grad:
            held[p.dtype] = held.get(p.dtype, 0) + p.numel()
    weights = " + ".join(f"{str(d).replace('torch.', '')} {n:,}" for d, n in sorted(held.items(), key=lambda x: -x[1]))
    compute = str(plan.autocast_dtype or plan.weights_dtype).replace("torch.", "")
    return (f"{plan.device.type}, weights {weights} (frozen), compute {compute}, attention {plan.attention}, "
            f"LoRA layer {plan.lora_layer}")


def _memory_without_checkpointing(model_config, cfg, t, longest, plan):
    """(estimated peak bytes of this run without checkpointing, bytes the device can give), or Nones."""
    from phitune.hardware import memory
    try:
        shape = memory.model_shape(model_config)
        need = memory.estimate_memory(shape, cfg.lora, t.batch_size, longest, False, plan.weights_dtype,
                                      plan.autocast_dtype, plan.device.type, cfg.model.quantize,
                                      rows_per_example=memory.rows_per_example(t.method)).total_bytes
        return need, memory.device_memory(plan.device)[0]
    except Exception:  # an architecture that cannot be built from its config alone, or an unknown device
        return None, None


def enable_checkpointing(model: PeftModel) -> None:
    """Non-reentrant checkpointing gives LoRA weights their gradients without input-grad hooks."""
    base = model.get_base_model()
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _preflight(plan, cfg, out, n_trainable, model_config, longest, log):
    """Refuse a run whose checkpoints cannot fit on disk; warn (with a fitting batch) before one whose
    estimated peak memory is beyond what the device has."""
    from phitune.hardware import memory
    t = cfg.train
    checkpoint = n_trainable * 4 * 3 + 50 * 2**20  # weights + Adam moments + tokenizer and state
    free = shutil.disk_usage(out).free
    if free < checkpoint * (t.save_total_limit + 3):
        raise PhituneError(f"output_dir: {out} has {free / 2**20:.0f} MiB free; checkpoints and the adapter need "
                           f"about {checkpoint * (t.save_total_limit + 3) / 2**20:.0f} MiB")
    warning = memory.preflight(model_config, cfg.lora, t.batch_size, t.gradient_accumulation_steps, longest,
                               plan.checkpointing, plan.weights_dtype, plan.autocast_dtype, plan.device,
                               quantize=cfg.model.quantize, rows_per_example=memory.rows_per_example(t.method))
    if warning:
        log(warning)


def _check_output_dir(out, resume):
    if not resume and checkpoints.complete(out):
        raise PhituneError(f"{out} holds checkpoints of an earlier run; add --resume to continue it, or choose "
                           f"another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".phitune-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PhituneError(f"output_dir: cannot write to {out} ({e.strerror})") from None


def _portable(name):
    """Record local model paths as absolute paths, so the adapter works from any directory."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _print_summary(m, final, out, speed, method="sft"):
    rows = [("steps", f"{m['steps']} ({m['epochs']} epochs)"),
            ("final train loss", f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"),
            *([("preference accuracy", f"{m['train_accuracy']:.3f} (margin {m['train_margin']:.4f}), last step")]
              if method != "sft" and m.get("train_accuracy") is not None else []),
            ("best validation loss", f"{m['best_val_loss']:.4f} at step {m['best_step']}"
             if m["best_val_loss"] is not None else "no validation"),
            ("tokens trained", f"{m['tokens']:,} ({m['answer_tokens']:,} answer tokens)"),
            ("time", f"{m['seconds']:.0f} s ({speed:.0f} tokens/s)"),
            ("adapter", str(final)), ("metrics", f"{out / 'metrics.jsonl'}, {out / 'loss.png'}")]
    print("\nphitune train: done\n" + summary(rows), file=sys.stderr)
    print(f"\nnext:\n  phitune chat --adapter_path {final}\n"
          f"  phitune compare --adapter_path {final} --questions examples/questions.yaml", file=sys.stderr)


def _start_adapter(cfg):
    """--adapter_path: check the adapter, take its LoRA shape into cfg.lora; returns its phitune.json (None
    without --adapter_path). The base model is resolved from it by the command (train.resolve_base)."""
    path = cfg.model.adapter_path
    if not path:
        return None
    from phitune.config import LoraArgs
    meta = adapters.read_adapter_meta(path)
    cfg.lora = LoraArgs(**adapters.lora_shape(path))
    return meta


REFERENCE_FILE = "reference_logps.pt"


def _check_same_method(ckpt: Path, t) -> None:
    """A checkpoint continues only the kind of training that wrote it: resuming an SFT run with --method dpo
    would take a reference from the wrong starting point and carry the step count over."""
    state = json.loads((ckpt / "state.json").read_text())
    was, beta = state.get("method", "sft"), state.get("beta")
    if was != t.method or (was != "sft" and beta is not None and beta != t.beta):
        then = f"--method {was}" + (f" --beta {beta:g}" if was != "sft" and beta is not None else "")
        now = f"--method {t.method}" + (f" --beta {t.beta:g}" if t.method != "sft" else "")
        raise PhituneError(f"{ckpt} was written by a {then} run; this one is {now}. Resume with {then}, or "
                           f"train into a new --output_dir")


def _reference_logps(run, out, resume):
    """DPO's reference log-probs of every training and validation pair: read back on --resume, else computed
    now from the model as training starts (eval mode: no dropout; the loop's forward and autocast), each
    process its share of the pairs, and saved to output_dir/reference_logps.pt."""
    import time
    path = out / REFERENCE_FILE
    marks = {"train": pair_data.fingerprint(run.train_set), "val": pair_data.fingerprint(run.val_set)}
    start = run.cfg.model.adapter_path or "the base model (new adapter)"
    start_key = str(Path(start).resolve()) if run.cfg.model.adapter_path else start  # however it is spelled
    if resume and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise PhituneError(f"{path}: unreadable ({str(e).splitlines()[0][:120]}); delete it and the "
                               f"checkpoints to start over") from None
        if saved.get("fingerprint") != marks:
            raise PhituneError(f"{path}: these reference log-probs belong to other data than this run's; resume "
                               f"with the same data and settings, or use a new --output_dir")
        if saved.get("start") not in (start_key, str(start)):
            raise PhituneError(f"{path}: these reference log-probs were computed from {saved.get('start')}, not "
                               f"from {start}; resume with the same --adapter_path, or use a new --output_dir")
        run.log(f"reference: log-probs of {len(run.train_set)} training and {len(run.val_set)} validation pairs "
                f"read back from {path} (computed before step 1 from {start})")
        return {"train": saved["train"], "val": saved["val"]}
    acc, t = run.accelerator, run.cfg.train
    began = time.perf_counter()
    module = run.pair_module
    module.eval()
    result = {}
    try:
        with models.autocast(run.device, run.plan.autocast_dtype):
            for name, examples in (("train", run.train_set), ("val", run.val_set)):
                mine = preference.reference_logps(module, examples, t.batch_size, run.tokenizer.pad_token_id,
                                                  run.device, acc.process_index, acc.num_processes)
                result[name] = acc.reduce(mine.to(run.device), "sum").cpu() if acc.num_processes > 1 else mine
    finally:
        module.train()
    if acc.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({**result, "fingerprint": marks, "start": start_key}, tmp)
        os.replace(tmp, path)
    acc.wait_for_everyone()
    run.log(f"reference: {start}; its log-probs of {len(run.train_set)} training and {len(run.val_set)} "
            f"validation pairs computed once, before step 1 ({time.perf_counter() - began:.1f} s, eval mode, no "
            f"second model in memory), kept in {path}")
    return result
