"""Training contracts that once broke silently: every rank joins every step, Ctrl-C + --resume is exact,
the logged learning rate is the one the step used, checkpointing is chosen from the memory estimate."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MEMORISE, run_cli, write_jsonl
from phitune.training import loss

ROWS = MEMORISE + [{"prompt": f"Question number {i}", "response": f"Answer number {i}."} for i in range(12)]


def adapter(run_dir):
    return load_file(run_dir / "final_adapter" / "adapter_model.safetensors")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n_examples", [10, 1])  # 5 batches on 2 processes; fewer examples than processes
def test_every_process_joins_every_step(n_examples, tiny_models, tmp_path):
    """An epoch's last step with fewer batches than processes finishes (it used to hang) and trains the
    same adapter as one process with the same effective batch."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:n_examples])
    common = ["--model", tiny_models["llama"], "--dataset_path", data, "--batch_size", 2, "--epochs", 1,
              "--val_split", 0, "--max_length", 64, "--lora_r", 4, "--lora_dropout", 0.0, "--warmup_ratio", 0,
              "--learning_rate", 1e-2, "--gradient_checkpointing", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("train", *common, "--output_dir", one, "--gradient_accumulation_steps", 2) == 0
    cmd = [sys.executable, "-m", "phitune", "train", *map(str, common), "--output_dir", str(two),
           "--gradient_accumulation_steps", "1", "--num_processes", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = adapter(one), adapter(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tiny_models, tmp_path, monkeypatch):
    """Interrupted inside a step, after that step's dropout draws: the checkpoint holds the RNG as of the
    last completed step, so --resume reproduces the uninterrupted adapter exactly."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["train", "--model", tiny_models["phi"], "--dataset_path", data, "--epochs", 2, "--batch_size", 2,
            "--gradient_accumulation_steps", 2, "--max_length", 64, "--lora_r", 4, "--lora_dropout", 0.3,
            "--learning_rate", 1e-2, "--val_split", 0, "--save_steps", 100, "--gradient_checkpointing", "false"]
    assert run_cli(*args, "--output_dir", tmp_path / "reference") == 0
    real, calls = loss.AnswerLoss.forward, []

    def interrupted(self, *a, **kw):
        out = real(self, *a, **kw)  # the step's dropout has drawn its random numbers by now
        if self.training:
            calls.append(1)
            if len(calls) == 7:  # first micro-batch of step 4
                raise KeyboardInterrupt
        return out
    monkeypatch.setattr(loss.AnswerLoss, "forward", interrupted)
    out = tmp_path / "interrupted"
    assert run_cli(*args, "--output_dir", out) == 130
    assert (out / "checkpoint-3").is_dir() and not (out / "final_adapter").exists()
    monkeypatch.setattr(loss.AnswerLoss, "forward", real)
    assert run_cli(*args, "--output_dir", out, "--resume") == 0
    want, got = adapter(tmp_path / "reference"), adapter(out)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_two_process_resume_continues_each_process_dropout(tiny_models, tmp_path):
    """Two processes with dropout: resuming from a checkpoint gives the adapter of the uninterrupted run,
    because each process gets its own RNG state back (not process 0's)."""
    import shutil
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = ["train", "--model", str(tiny_models["llama"]), "--dataset_path", str(data), "--batch_size", "2",
              "--gradient_accumulation_steps", "1", "--max_steps", "4", "--save_steps", "2", "--max_length", "64",
              "--lora_r", "4", "--lora_dropout", "0.3", "--learning_rate", "1e-2", "--val_split", "0",
              "--gradient_checkpointing", "false", "--num_processes", "2"]

    def train(out, *extra):
        done = subprocess.run([sys.executable, "-m", "phitune", *common, "--output_dir", str(out), *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(reference)
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")
    train(resumed, "--resume")
    want, got = adapter(reference), adapter(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_logged_lr_is_the_rate_each_step_used(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", out,
                   "--max_steps", 4, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--max_length", 64,
                   "--learning_rate", 1e-3, "--warmup_ratio", 0, "--val_split", 0) == 0
    lrs = [r["lr"] for r in metrics(out) if "lr" in r]
    assert lrs[0] == pytest.approx(1e-3)  # no warm-up: the first step uses the peak rate
    assert lrs[-1] > 0 and lrs == sorted(lrs, reverse=True)


def _checkpointing_choice(tiny_models, tmp_path, capsys, name, *extra):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / name
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", out,
                   "--max_steps", 2, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--max_length", 64,
                   "--val_split", 0, "--lora_dropout", 0.0, *extra) == 0
    meta = json.loads((out / "final_adapter" / "phitune.json").read_text())
    return capsys.readouterr().err, meta["hardware"], adapter(out)


def test_auto_checkpointing_follows_the_memory_estimate(tiny_models, tmp_path, capsys, monkeypatch):
    err, hw, roomy = _checkpointing_choice(tiny_models, tmp_path, capsys, "roomy")
    assert hw["gradient_checkpointing"] is False and "gradient checkpointing off: needs ~" in err
    monkeypatch.setenv("PHITUNE_AVAILABLE_MEMORY", "1MiB")  # a device with almost no memory left
    err, hw, tight = _checkpointing_choice(tiny_models, tmp_path, capsys, "tight")
    assert hw["gradient_checkpointing"] is True and "gradient checkpointing on: needs ~" in err
    assert "0.0 GiB available" in err
    for key in roomy:  # same adapter with and without checkpointing (fixed seed, no dropout)
        torch.testing.assert_close(tight[key], roomy[key], rtol=1e-4, atol=1e-6)
    monkeypatch.delenv("PHITUNE_AVAILABLE_MEMORY")
    err, hw, _ = _checkpointing_choice(tiny_models, tmp_path, capsys, "forced", "--gradient_checkpointing")
    assert hw["gradient_checkpointing"] is True and "--gradient_checkpointing true" in err


def test_out_of_memory_turns_checkpointing_on_before_splitting(tiny_models, tmp_path, capsys, monkeypatch):
    from phitune.training import loop as train_loop
    real, calls = train_loop._forward_backward, []

    def oom_once(run, *a, **kw):
        calls.append(run.plan.checkpointing)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected")
        return real(run, *a, **kw)
    monkeypatch.setattr(train_loop, "_forward_backward", oom_once)
    err, hw, _ = _checkpointing_choice(tiny_models, tmp_path, capsys, "oom")
    assert calls[:2] == [False, True]  # the retry ran with checkpointing on, same micro-batches
    assert "retrying with gradient checkpointing on" in err and "micro-batches of" not in err
    assert hw["gradient_checkpointing"] is True
