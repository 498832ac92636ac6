"""`phitune train`: LoRA fine-tuning with a plain loop on Accelerate.

Read top to bottom: data -> model -> adapters -> optimizer -> (resume) -> loop -> final adapter.
"""
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from phitune import adapters, checkpoints, data, models
from phitune.config import RunConfig, add_arguments, build_config
from phitune.cpu_attention import use_cpu_attention
from phitune.cpu_lora import use_fused_lora
from phitune.errors import ConfigError, PhituneError
from phitune.loss import AnswerLoss, summed_loss
from phitune.report import MetricsLog, ppl, summary
from phitune.templates import Template
from phitune.trackers import Trackers  # trackers (issue 16)


EAGER_ATTENTION_MAX_LEN = 512  # beyond this the (T x T) attention weights kept for backward grow too large


def add_parser(parser):
    add_arguments(parser)


def main(args):
    parts = build_config(args)
    cfg = RunConfig(**parts)
    if not cfg.data.dataset_path:
        raise ConfigError("dataset_path", "is required: the JSONL file to train on")
    if not cfg.train.output_dir:
        raise ConfigError("output_dir", "is required: where the adapter and checkpoints go")
    if cfg.train.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch(cfg.train.num_processes, args._argv)
    train(cfg)


def launch(n, given):
    """Re-run this command as N data-parallel processes through torch.distributed (gloo on CPU, NCCL on CUDA)."""
    import socket
    import subprocess
    argv, skip = [], False
    for a in given:  # drop --num_processes N: each worker is one process
        if skip:
            skip = False
        elif a == "--num_processes":
            skip = True
        elif not a.startswith("--num_processes="):
            argv.append(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "phitune", *argv]
    print(f"phitune: launching {n} processes", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def log(accelerator, *lines):
    if accelerator.is_main_process:
        for line in lines:
            tqdm.write(line, file=sys.stderr)


def train(cfg):
    """Run one fine-tuning job described by a RunConfig; returns the final adapter directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    t = cfg.train
    out = Path(t.output_dir)
    # ---- inputs first: a bad line or field fails in seconds, before any weights are loaded
    train_records, fmt = data.read_records(cfg.data.dataset_path, cfg.data.dataset_split, cfg.data.columns)
    if cfg.data.val_path:
        val_records, _ = data.read_records(cfg.data.val_path, cfg.data.val_dataset_split, cfg.data.columns)
    else:
        train_records, val_records = data.split_validation(train_records, cfg.data.val_split, t.seed)
    model_config = models.load_config(cfg.model.model, cfg.model.trust_remote_code)
    context = getattr(model_config, "max_position_embeddings", None)
    if context and cfg.data.max_length > context:
        raise ConfigError("max_length", f"{cfg.data.max_length} is beyond this model's context of {context} tokens")
    _check_output_dir(out, t.resume)

    accelerator = Accelerator(cpu=models.pick_device().type == "cpu")
    set_seed(t.seed)
    trackers = Trackers.start(cfg, accelerator)  # trackers (issue 16): no-op without --report_to
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    weights_dtype, autocast_dtype = models.precision_plan(device, cfg.model.precision, model_config.model_type)
    quantization = models.quantization_config(cfg.model.quantize, device)

    # ---- tokenise with the template that chat/compare/eval will use too
    tokenizer = models.load_tokenizer(cfg.model.model, cfg.model.trust_remote_code)
    template = Template(tokenizer, cfg.data.template, cfg.data.system_prompt)
    encode = dict(template=template, max_length=cfg.data.max_length, train_on_prompt=cfg.data.train_on_prompt,
                  long_examples=cfg.data.long_examples)
    train_set, train_stats = data.encode_records(train_records, **encode)
    val_set, val_stats = data.encode_records(val_records, **encode) if val_records else ([], None)
    if not train_set:
        raise PhituneError(f"{cfg.data.dataset_path}: no example has an answer token within --max_length "
                           f"{cfg.data.max_length}; raise --max_length")
    log(accelerator, f"data: {fmt} records, template {template.kind} (stops at {', '.join(template.stop_tokens)})",
        train_stats.report("train"), *( [val_stats.report("validation")] if val_stats else []))

    # ---- model and adapters
    model = models.load_model(cfg.model.model, weights_dtype, cfg.model.trust_remote_code, quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    cpu_bf16 = device.type == "cpu" and autocast_dtype == torch.bfloat16 and quantization is None
    if device.type == "cpu" and max(len(e["input_ids"]) for e in train_set) <= EAGER_ATTENTION_MAX_LEN:
        # For short sequences PyTorch's CPU SDPA kernels (mostly their backward) are slower than plain
        # matmul + softmax: ~30% per step on the demo model, interleaved runs in docs/benchmarks.md;
        # under bf16 autocast phitune's own version of it saves another fifth of the step.
        _plain_attention(model, cpu_bf16)
    model, targets = adapters.attach_lora(model, cfg.lora, seed=t.seed)
    # PEFT's generic LoRA path spent more time in casts, dropout draws and scaling than in matmuls on
    # CPU (docs/benchmarks.md); bf16 runs get one fused layer, fp32 runs the cheaper dropout.
    fused = use_fused_lora(model, fuse=cpu_bf16) if device.type == "cpu" else 0
    lines, n_trainable = adapters.trainable_summary(model, targets)
    log(accelerator, f"model: {cfg.model.model} ({models.describe(model.get_base_model())}) on {device}, "
                     f"weights {str(weights_dtype)[6:]}, compute {str(autocast_dtype or weights_dtype)[6:]}"
                     + (f", {fused} of {len(targets)} LoRA layers on phitune's fused CPU path" if fused else ""),
        *lines)
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing gives LoRA weights their gradients without input-grad hooks.
        _enable_checkpointing(model.get_base_model())
    if device.type == "cpu" and accelerator.is_main_process:
        _preflight(model, t, [len(e["input_ids"]) for e in train_set], n_trainable, out, lambda m: log(accelerator, m),
                   autocast_dtype)  # issue 16: the compute dtype, for phitune.memory's estimate
    loss_model = AnswerLoss(model)
    if t.torch_compile:
        for layer in loss_model.decoder.layers:  # regional compilation: one graph per block, compiled once
            layer.compile(dynamic=True)

    # ---- optimizer and schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    lengths = [len(e["input_ids"]) for e in train_set]
    n_batches = math.ceil(len(train_set) / t.batch_size)
    steps_per_epoch = max(1, math.ceil(n_batches / (t.gradient_accumulation_steps * world)))
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(t.warmup_ratio * total_steps), total_steps)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    # ---- resume
    state = {"best_val": None, "best_step": None, "bad_evals": 0, "tokens": 0, "answer_tokens": 0, "seconds": 0.0}
    start = 0
    ckpt = checkpoints.latest(out) if t.resume else None
    if ckpt is not None:
        state = checkpoints.load(ckpt, model, optimizer, scheduler)
        start = state["step"]
        log(accelerator, f"resuming from {ckpt} (step {start} of {total_steps})")
    elif t.resume:
        log(accelerator, f"no complete checkpoint in {out}; starting from the beginning")
    metrics = MetricsLog(out, resume_step=start) if accelerator.is_main_process else None

    def save_checkpoint(step):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                checkpoints.save(out, step, model, optimizer, scheduler, state, t.save_total_limit)
            except OSError as e:
                raise PhituneError(f"could not write checkpoint-{step} in {out} ({e.strerror or e}); the checkpoints "
                                   f"already there are intact: free space and rerun with --resume") from None

    def validate():
        if not val_set:
            return None
        loss_model.eval()
        with models.autocast(device, autocast_dtype):
            total, count = summed_loss(loss_model, val_set, t.batch_size, tokenizer.pad_token_id, device, rank, world)
        loss_model.train()
        total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
        return (total / count).item()

    # ---- the loop: one iteration = one optimizer step over gradient_accumulation_steps micro-batches
    loss_model.train()
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    nonfinite, stop_reason, step, split, completed = 0, None, start, 1, start
    batches, batches_epoch = None, None
    run_start, tokens_at_start, seconds_before = time.perf_counter(), state["tokens"], state["seconds"]
    try:
        for step in range(start + 1, total_steps + 1):
            epoch, index = divmod(step - 1, steps_per_epoch)
            if batches_epoch != epoch:
                batches = data.length_grouped_batches(lengths, t.batch_size, t.seed, epoch)
                batches_epoch = epoch
            group = t.gradient_accumulation_steps * world
            mine = batches[index * group:(index + 1) * group][rank::world]
            micro = [_to(data.collate([train_set[i] for i in b], tokenizer.pad_token_id), device) for b in mine]
            # Normalise by the trained tokens of the whole step (all micro-batches, all processes), so
            # long and short examples weigh per token, not per batch.
            local = torch.tensor(float(sum(int((m["labels"][:, 1:] != data.IGNORE).sum()) for m in micro)),
                                 device=device)
            step_tokens = accelerator.reduce(local, "sum").clamp(min=1)
            while True:
                try:
                    step_loss, seen = _forward_backward(loss_model, accelerator, micro, split, step_tokens,
                                                        device, autocast_dtype)
                    break
                except torch.OutOfMemoryError:
                    # Same effective batch: each micro-batch is cut into more, smaller pieces.
                    optimizer.zero_grad(set_to_none=True)
                    _free_memory(device)
                    if split >= t.batch_size:
                        raise PhituneError("out of memory even with one example per micro-batch; lower "
                                           "--max_length, turn on --gradient_checkpointing or use --quantize 4bit")
                    split *= 2
                    log(accelerator, f"out of memory at step {step}: retrying with micro-batches of "
                                     f"{math.ceil(t.batch_size / split)} and {split}x the accumulation steps "
                                     f"(same effective batch)")
            state["tokens"] += seen
            state["answer_tokens"] += int(step_tokens)
            grad_norm = (accelerator.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm
                         else torch.zeros(()))
            step_loss = accelerator.reduce(step_loss, "sum") / step_tokens
            if not (torch.isfinite(step_loss) and torch.isfinite(torch.as_tensor(grad_norm))):
                nonfinite += 1  # skip: the weights keep their last finite values
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                completed = step
                log(accelerator, f"step {step}: non-finite loss or gradient, step skipped ({nonfinite} in a row)")
                if nonfinite >= t.max_nonfinite_steps:
                    stop_reason = (f"{nonfinite} steps in a row had a non-finite loss or gradient; lower "
                                   f"--learning_rate or use --precision fp32. The last good checkpoint is kept")
                    break
                continue
            nonfinite = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step  # the weights now hold this step

            elapsed = seconds_before + time.perf_counter() - run_start
            speed = (state["tokens"] - tokens_at_start) / max(time.perf_counter() - run_start, 1e-9)
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if metrics and step % t.logging_steps == 0:
                metrics.add(step=step, epoch=round(step / steps_per_epoch, 4), loss=step_loss.item(), lr=lr,
                            grad_norm=float(grad_norm), tokens=state["tokens"], answer_tokens=state["answer_tokens"],
                            tokens_per_s=speed, seconds=elapsed)
                trackers.log(metrics.rows[-1], step)  # trackers (issue 16)

            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if val_set and (epoch_end or (t.eval_steps and step % t.eval_steps == 0)):
                val_loss = validate()
                improved = state["best_val"] is None or val_loss < state["best_val"]
                if improved:
                    state.update(best_val=val_loss, best_step=step, bad_evals=0)
                    if accelerator.is_main_process:
                        checkpoints.atomic_dir(out / "best_adapter", lambda d: model.save_pretrained(
                            d, safe_serialization=True, save_embedding_layers=False))
                else:
                    state["bad_evals"] += 1
                if metrics:
                    metrics.add(step=step, epoch=round(step / steps_per_epoch, 4), val_loss=val_loss,
                                val_ppl=ppl(val_loss))
                    trackers.log(metrics.rows[-1], step)  # trackers (issue 16)
                log(accelerator, f"step {step}: validation loss {val_loss:.4f} (perplexity {ppl(val_loss):.2f})"
                                 + (" best so far" if improved else ""))
                if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                    stop_reason = f"early stopping: no better validation loss for {state['bad_evals']} evaluations"
            state["seconds"] = elapsed
            if (t.save_steps and step % t.save_steps == 0) or epoch_end or stop_reason:
                save_checkpoint(step)
            if stop_reason:
                break
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # drop a half-accumulated step
        if completed > start and not (out / f"checkpoint-{completed}").is_dir():
            save_checkpoint(completed)
        log(accelerator, f"interrupted at step {completed}; continue with:\n  {_resume_command()}")
        sys.exit(130)
    bar.close()
    if stop_reason and nonfinite:
        raise PhituneError(stop_reason)
    if stop_reason:
        log(accelerator, stop_reason)

    # ---- final adapter: the best validated weights when there was validation, else the last
    final = out / "final_adapter"
    if state["best_step"] is not None and state["best_step"] != step:
        from safetensors.torch import load_file
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(out / "best_adapter" / "adapter_model.safetensors"))
    final_metrics = {"steps": step, "epochs": round(step / steps_per_epoch, 3),
                     "train_loss": next((r["loss"] for r in reversed(metrics.rows) if "loss" in r), None) if metrics else None,
                     "best_val_loss": state["best_val"], "best_step": state["best_step"],
                     "tokens": state["tokens"], "answer_tokens": state["answer_tokens"],
                     "seconds": round(state["seconds"], 1)}
    if accelerator.is_main_process:
        meta = {"base": {"model": _portable(cfg.model.model), "model_type": model_config.model_type,
                         "hidden_size": model_config.hidden_size, "num_hidden_layers": model_config.num_hidden_layers,
                         "vocab_size": model_config.vocab_size},
                "template": template.to_meta(),
                "data": {"format": fmt, "train_examples": len(train_set), "val_examples": len(val_set),
                         "max_length": cfg.data.max_length, "train_on_prompt": cfg.data.train_on_prompt,
                         "truncated": train_stats.truncated, "dropped": train_stats.dropped},
                "lora": {"targets": len(targets), "trainable_parameters": n_trainable},
                "selected": "best validation loss" if state["best_step"] else "last step",
                "training": cfg.to_dict(), "metrics": final_metrics}
        checkpoints.atomic_dir(final, lambda d: adapters.save_adapter(model, tokenizer, d, meta))
        metrics.plot()
        trackers.finish()  # trackers (issue 16)
        _print_summary(final_metrics, final, out, speed=final_metrics["tokens"] / max(state["seconds"], 1e-9))
    accelerator.wait_for_everyone()
    return final


def _forward_backward(loss_model, accelerator, micro, split, step_tokens, device, autocast_dtype):
    """Forward and backward over one step's micro-batches, each cut into `split` row chunks.

    Returns (summed loss of this process, tokens seen by all processes)."""
    world = accelerator.num_processes
    pieces = [chunk for m in micro for chunk in _rows(m, split)]
    total, tokens = torch.zeros((), device=device), 0
    for i, batch in enumerate(pieces):
        last = i == len(pieces) - 1  # DDP syncs gradients once, after the last piece
        with (nullcontext() if last else accelerator.no_sync(loss_model)), models.autocast(device, autocast_dtype):
            loss_sum, _ = loss_model(**batch)
        accelerator.backward(loss_sum * world / step_tokens)
        total += loss_sum.detach()
        tokens += int(batch["attention_mask"].sum()) * world
    return total, tokens


def _rows(batch, split):
    if split == 1:
        return [batch]
    size = math.ceil(batch["input_ids"].shape[0] / split)
    return [{k: v[s:s + size] for k, v in batch.items()} for s in range(0, batch["input_ids"].shape[0], size)]


def _free_memory(device):
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _preflight(model, t, lengths, n_trainable, out, log_fn, compute_dtype=None):
    """Warn before a CPU run that will not fit in RAM; refuse one whose checkpoints cannot fit on disk."""
    import shutil
    checkpoint = n_trainable * 4 * 3 + 50 * 2**20  # weights + Adam moments + tokenizer and state
    free = shutil.disk_usage(out).free
    if free < checkpoint * (t.save_total_limit + 3):
        raise PhituneError(f"output_dir: {out} has {free / 2**20:.0f} MiB free; checkpoints and the adapter need "
                           f"about {checkpoint * (t.save_total_limit + 3) / 2**20:.0f} MiB")
    # issue 16: the same estimate and suggestion as `phitune plan` (phitune.memory)
    from phitune import memory
    warning = memory.preflight(model.config, n_trainable, t.batch_size, t.gradient_accumulation_steps, max(lengths),
                               t.gradient_checkpointing, model.get_input_embeddings().weight.dtype, compute_dtype,
                               "cpu")
    if warning:
        log_fn(warning)


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


def _plain_attention(model, cpu_bf16):
    if cpu_bf16:
        try:
            return use_cpu_attention(model)
        except (ValueError, KeyError):  # a model (remote code) that accepts only its own implementations
            pass
    model.set_attn_implementation("eager")


def _enable_checkpointing(model):
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _portable(name):
    """Record local model paths as absolute paths, so the adapter works from any directory."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _resume_command():
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    prog = "phitune" if Path(sys.argv[0]).name in ("phitune", "__main__.py") else f"python {sys.argv[0]}"
    return f"{prog} {shlex.join(argv)} --resume"


def _print_summary(m, final, out, speed):
    rows = [("steps", f"{m['steps']} ({m['epochs']} epochs)"),
            ("final train loss", f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"),
            ("best validation loss", f"{m['best_val_loss']:.4f} at step {m['best_step']}"
             if m["best_val_loss"] is not None else "no validation"),
            ("tokens trained", f"{m['tokens']:,} ({m['answer_tokens']:,} answer tokens)"),
            ("time", f"{m['seconds']:.0f} s ({speed:.0f} tokens/s)"),
            ("adapter", str(final)), ("metrics", f"{out / 'metrics.jsonl'}, {out / 'loss.png'}")]
    print("\nphitune train: done\n" + summary(rows), file=sys.stderr)
    print(f"\nnext:\n  phitune chat --adapter_path {final}\n"
          f"  phitune compare --adapter_path {final} --questions examples/questions.yaml", file=sys.stderr)
