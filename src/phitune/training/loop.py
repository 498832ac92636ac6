"""The training loop: step, validate, checkpoint. Everything it needs comes built in a Run (train_setup.py).

One iteration is one optimizer step over gradient_accumulation_steps micro-batches on every process.
sft averages the loss over the step's trained tokens; dpo/orpo (run.objective) over the step's pairs (and
ORPO's NLL over the chosen answers' tokens), and log preference metrics (training/preference.py).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from tqdm.auto import tqdm

from phitune.data import records as data
from phitune.errors import PhituneError
from phitune.models import loading as models
from phitune.training import checkpoints, preference
from phitune.training.loss import summed_loss
from phitune.training.report import ppl
from phitune.training.setup import Run, enable_checkpointing


def fit(run: Run) -> Optional[str]:
    """Train from run.progress.step to run.total_steps; returns why it stopped early (or None).

    Ctrl-C saves the last completed step (its RNG state as of the end of that step, so --resume
    continues exactly as an uninterrupted run would) and re-raises KeyboardInterrupt."""
    t, p, acc = run.cfg.train, run.progress, run.accelerator
    lengths = run.lengths()
    bar = tqdm(total=run.total_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not acc.is_main_process)
    start, nonfinite, split, stop_reason = p.step, 0, 1, None
    rng_after = {p.step: checkpoints.rng_state()}  # RNG as of the end of each completed step
    batches, batches_epoch = None, None
    run_start, tokens_at_start, seconds_before = time.perf_counter(), p.tokens, p.seconds
    run.loss_model.train()
    try:
        for step in range(start + 1, run.total_steps + 1):
            epoch, index = divmod(step - 1, run.steps_per_epoch)
            if batches_epoch != epoch:
                batches, batches_epoch = data.length_grouped_batches(lengths, t.batch_size, t.seed, epoch), epoch
            micro, weight = _my_micro_batches(run, batches, index)
            # Normalise by the trained tokens of the whole step (all micro-batches, all processes), so
            # long and short examples weigh per token, not per batch.
            local = torch.tensor(weight * sum(int((m["labels"][:, 1:] != data.IGNORE).sum()) for m in micro),
                                 device=run.device)
            step_tokens = acc.reduce(local, "sum").clamp(min=1)
            # dpo/orpo: the step's pairs and NLL tokens, over which their loss terms are averaged
            norms = None if run.objective is None else acc.reduce(
                (weight * sum(run.objective.norms(m) for m in micro)).to(run.device), "sum")
            step_loss, seen, split = _step_with_retry(run, micro, weight, split,
                                                      step_tokens if norms is None else norms, step)
            p.tokens += seen
            p.answer_tokens += int(step_tokens)
            grad_norm = acc.clip_grad_norm_(run.trainable, t.max_grad_norm) if t.max_grad_norm else torch.zeros(())
            if run.objective is None:
                step_loss, shown = acc.reduce(step_loss, "sum") / step_tokens, {}
            else:  # step_loss holds the summed preference statistics of this process
                shown = run.objective.metrics(acc.reduce(step_loss, "sum"))
                step_loss = torch.tensor(shown.pop("loss"))
            lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
            finite = bool(torch.isfinite(step_loss) and torch.isfinite(torch.as_tensor(grad_norm)))
            with _interrupt_after():  # Ctrl-C here would leave the weights a step ahead of p.step
                if finite:
                    run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                p.step = step  # the weights now hold this step (or, when skipped, keep their last finite values)
                rng_after = {step: checkpoints.rng_state()}
            p.seconds = seconds_before + time.perf_counter() - run_start
            bar.update(1)
            if not finite:
                nonfinite += 1
                run.log(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite} in a row)")
                if nonfinite >= t.max_nonfinite_steps:
                    raise PhituneError(f"{nonfinite} steps in a row had a non-finite loss or gradient; lower "
                                       f"--learning_rate or use --precision fp32. The last good checkpoint is kept")
            else:
                nonfinite = 0
                speed = (p.tokens - tokens_at_start) / max(time.perf_counter() - run_start, 1e-9)
                if run.objective is None:
                    bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                else:
                    bar.set_postfix(loss=f"{step_loss.item():.4f}", margin=f"{shown['margin']:.3f}",
                                    acc=f"{shown['accuracy']:.2f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                if step % t.logging_steps == 0:
                    run.record(step=step, epoch=round(step / run.steps_per_epoch, 4), loss=step_loss.item(), **shown,
                               lr=lr, grad_norm=float(grad_norm), tokens=p.tokens, answer_tokens=p.answer_tokens,
                               tokens_per_s=speed, seconds=p.seconds)
            # A skipped step still ends its epoch (or the run): validation and the checkpoint happen as planned.
            epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
            if run.val_set and (epoch_end or (t.eval_steps and step % t.eval_steps == 0)):
                stop_reason = _validate_and_keep_best(run, step)
            if (t.save_steps and step % t.save_steps == 0) or epoch_end or stop_reason:
                _save(run, step, rng_after[step])
            if stop_reason:
                break
    except KeyboardInterrupt:
        bar.close()
        run.optimizer.zero_grad(set_to_none=True)  # drop a half-accumulated step
        if p.step > start and not (run.out / f"checkpoint-{p.step}").is_dir():
            _save(run, p.step, rng_after.get(p.step))
        raise
    bar.close()
    if stop_reason:
        run.log(stop_reason)
    return stop_reason


@contextmanager
def _interrupt_after():
    """Hold a Ctrl-C that arrives inside the block until the block is done (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _my_micro_batches(run, batches, index):
    """(micro-batches, weight): this process's share of optimizer step `index` of the epoch.

    Every process must run a backward in every step (the gradient all-reduce waits for all of them):
    when an epoch's last step has fewer batches than processes, a process without one runs one row of
    a real batch with weight 0, which only joins the reduction."""
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    group = run.cfg.train.gradient_accumulation_steps * world
    step_batches = batches[index * group:(index + 1) * group]
    mine = step_batches[rank::world]
    collate = lambda b: _to(run.collate(b), run.device)  # noqa: E731
    return ([collate(b) for b in mine], 1.0) if mine else ([collate(step_batches[0][:1])], 0.0)


def _step_with_retry(run, micro, weight, split, step_tokens, step):
    """Forward and backward of one step; on out-of-memory, first checkpoint activations, then split."""
    while True:
        try:
            loss, seen = _forward_backward(run, micro, weight, split, step_tokens)
            return loss, seen, split
        except torch.OutOfMemoryError:
            if run.accelerator.num_processes > 1:  # the other processes already wait in the gradient all-reduce
                raise PhituneError(f"out of memory at step {step} in process {run.accelerator.process_index}; "
                                   f"lower --batch_size (raise --gradient_accumulation_steps to keep the "
                                   f"effective batch) or turn on --gradient_checkpointing") from None
            run.optimizer.zero_grad(set_to_none=True)
            _free_memory(run.device)
            if not run.plan.checkpointing:
                run.plan.checkpointing, run.plan.checkpointing_reason = True, "on: a step ran out of memory"
                enable_checkpointing(run.model)
                run.log(f"out of memory at step {step}: retrying with gradient checkpointing on")
                continue
            if split >= run.cfg.train.batch_size:
                raise PhituneError("out of memory even with one example per micro-batch; lower --max_length "
                                   "or use --quantize 4bit") from None
            split *= 2
            run.log(f"out of memory at step {step}: retrying with micro-batches of "
                    f"{math.ceil(run.cfg.train.batch_size / split)} and {split}x the accumulation steps "
                    f"(same effective batch)")


def _forward_backward(run, micro, weight, split, step_tokens):
    """Forward and backward over one step's micro-batches, each cut into `split` row chunks, the loss
    scaled by `weight` (0 for a stand-in batch). Returns (summed loss of this process, tokens seen)."""
    if run.objective is not None:
        return _forward_backward_pairs(run, micro, weight, split, step_tokens)
    acc, world = run.accelerator, run.accelerator.num_processes
    pieces = [chunk for m in micro for chunk in _rows(m, split)]
    total, tokens = torch.zeros((), device=run.device), 0
    for i, batch in enumerate(pieces):
        last = i == len(pieces) - 1  # DDP syncs gradients once, after the last piece
        with (nullcontext() if last else acc.no_sync(run.loss_model)), \
                models.autocast(run.device, run.plan.autocast_dtype):
            loss_sum, _ = run.loss_model(**batch)
        acc.backward(loss_sum * (weight * world) / step_tokens)
        total += weight * loss_sum.detach()
        tokens += int(weight * batch["attention_mask"].sum()) * world
    return total, tokens


def _forward_backward_pairs(run, micro, weight, split, norms):
    """_forward_backward for dpo/orpo: `norms` holds the step's (pairs, NLL tokens) over all processes.
    Returns (summed preference statistics of this process, in preference.STATS order; tokens seen)."""
    acc, world, objective = run.accelerator, run.accelerator.num_processes, run.objective
    pieces = [piece for m in micro for piece in preference.split_pairs(m, split)]
    total, tokens = torch.zeros(len(preference.STATS), dtype=torch.float64, device=run.device), 0
    for i, batch in enumerate(pieces):
        last = i == len(pieces) - 1  # DDP syncs gradients once, after the last piece
        with (nullcontext() if last else acc.no_sync(run.loss_model)), \
                models.autocast(run.device, run.plan.autocast_dtype):
            out = run.loss_model(**preference.model_inputs(batch))
        pair_loss, nll_sum, stats = objective.terms(out, batch.get("ref_logps"))
        acc.backward(objective.loss(pair_loss, nll_sum, norms[0], norms[1]) * (weight * world))
        total += weight * stats.double()
        tokens += int(weight * batch["attention_mask"].sum()) * world
    return total, tokens


def _validate_and_keep_best(run, step):
    """Validation loss over all processes; saves best_adapter/ on improvement. Returns a stop reason."""
    t = run.cfg.train
    if run.objective is not None:
        return _validate_pairs(run, step)
    run.loss_model.eval()
    with models.autocast(run.device, run.plan.autocast_dtype):
        total, count = summed_loss(run.loss_model, run.val_set, t.batch_size, run.tokenizer.pad_token_id,
                                   run.device, run.accelerator.process_index, run.accelerator.num_processes)
    run.loss_model.train()
    val_loss = (run.accelerator.reduce(total, "sum") / run.accelerator.reduce(count, "sum")).item()
    improved = _keep_if_best(run, step, val_loss)
    run.record(step=step, epoch=round(step / run.steps_per_epoch, 4), val_loss=val_loss, val_ppl=ppl(val_loss))
    run.log(f"step {step}: validation loss {val_loss:.4f} (perplexity {ppl(val_loss):.2f})"
            + (" best so far" if improved else ""))
    return _early_stop(run)


def _validate_pairs(run, step):
    """Validation of dpo/orpo on the held-out pairs: the step's metrics (val_loss, val_accuracy, ...) over
    all processes; the best adapter is chosen on val_loss."""
    t, acc = run.cfg.train, run.accelerator
    run.loss_model.eval()
    with models.autocast(run.device, run.plan.autocast_dtype):
        stats = preference.pair_stats(run.pair_module, run.objective, run.val_set, run.reference.get("val"),
                                      t.batch_size, run.tokenizer.pad_token_id, run.device, acc.process_index,
                                      acc.num_processes, nll_on_prompt=run.cfg.data.train_on_prompt)
    run.loss_model.train()
    shown = run.objective.metrics(acc.reduce(stats, "sum"), prefix="val_")
    improved = _keep_if_best(run, step, shown["val_loss"])
    run.record(step=step, epoch=round(step / run.steps_per_epoch, 4), **shown)
    run.log(f"step {step}: validation loss {shown['val_loss']:.4f}, preference accuracy {shown['val_accuracy']:.3f}, "
            f"margin {shown['val_margin']:.4f}" + (" best so far" if improved else ""))
    return _early_stop(run)


def _keep_if_best(run, step, val_loss):
    """Save best_adapter/ when val_loss improves on the best so far; returns whether it did."""
    p = run.progress
    improved = p.best_val is None or val_loss < p.best_val
    if improved:
        p.best_val, p.best_step, p.bad_evals = val_loss, step, 0
        if run.accelerator.is_main_process:
            checkpoints.atomic_dir(run.out / "best_adapter", lambda d: run.model.save_pretrained(
                d, safe_serialization=True, save_embedding_layers=False))
    else:
        p.bad_evals += 1
    return improved


def _early_stop(run):
    t, p = run.cfg.train, run.progress
    if t.early_stopping_patience and p.bad_evals >= t.early_stopping_patience:
        return f"early stopping: no better validation loss for {p.bad_evals} evaluations"
    return None


def _save(run, step, rng):
    run.accelerator.wait_for_everyone()
    if run.accelerator.num_processes > 1:  # every process's dropout stream, so --resume continues each one
        from accelerate.utils import gather_object
        rng = {**(rng or checkpoints.rng_state()), "ranks": gather_object([rng or checkpoints.rng_state()])}
    if run.accelerator.is_main_process:
        try:
            checkpoints.save(run.out, step, run.model, run.optimizer, run.scheduler, _state(run),
                             run.cfg.train.save_total_limit, rng=rng)
        except OSError as e:
            raise PhituneError(f"could not write checkpoint-{step} in {run.out} ({e.strerror or e}); the checkpoints "
                               f"already there are intact: free space and rerun with --resume") from None


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


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _state(run) -> dict:
    """What a checkpoint's state.json holds: the progress, and the method that wrote it (--resume checks it)."""
    t = run.cfg.train
    return {**run.progress.to_dict(), "method": t.method, **({"beta": t.beta} if t.method != "sft" else {}),
            **({"rpo_alpha": t.rpo_alpha} if t.rpo_alpha else {})}
