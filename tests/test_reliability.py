"""Faults: SIGKILL at random moments then --resume, corrupt checkpoints, non-finite steps, random JSONL."""
import json
import random
import signal
import subprocess
import sys
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import MEMORISE, run_cli, write_jsonl
from phitune.data import records as data
from phitune.errors import DataError

ROWS = MEMORISE + [{"prompt": f"Question number {i}", "response": f"Answer number {i}."} for i in range(12)]


def train_cmd(tiny_models, data_file, out):
    return [sys.executable, "-m", "phitune", "train", "--model", str(tiny_models["phi"]), "--dataset_path",
            str(data_file), "--output_dir", str(out), "--epochs", "6", "--batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_length", "64", "--lora_r", "4", "--lora_dropout", "0.1",
            "--learning_rate", "1e-2", "--val_split", "0", "--save_steps", "1", "--save_total_limit", "2"]


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_models, tmp_path):
    data_file = write_jsonl(tmp_path / "d.jsonl", ROWS)
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(tiny_models, data_file, reference), check=True, capture_output=True, timeout=300)
    want = load_file(reference / "final_adapter" / "adapter_model.safetensors")
    rng = random.Random(7)
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(train_cmd(tiny_models, data_file, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = rng.randint(2, 20)  # kill soon after checkpoint `target` appears: mid-step or mid-save
        deadline = time.time() + 120
        while time.time() < deadline and not (out / f"checkpoint-{target}").exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "final_adapter").exists() or proc.returncode == 0
        result = subprocess.run(train_cmd(tiny_models, data_file, out) + ["--resume"], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        got = load_file(out / "final_adapter" / "adapter_model.safetensors")
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_corrupt_checkpoint_is_named(tiny_models, tmp_path, capsys):
    data_file = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    args = ["train", "--model", tiny_models["phi"], "--dataset_path", data_file, "--output_dir", out, "--max_steps",
            2, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--val_split", 0, "--save_steps", 1]
    assert run_cli(*args) == 0
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert run_cli(*args, "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint-2: cannot resume from this checkpoint" in err and "delete it" in err


def test_nonfinite_steps_are_skipped_then_stop(tiny_models, tmp_path, capsys):
    data_file = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    code = run_cli("train", "--model", tiny_models["phi"], "--dataset_path", data_file, "--output_dir", out,
                   "--learning_rate", "1e30", "--max_grad_norm", 0, "--batch_size", 4, "--gradient_accumulation_steps",
                   1, "--val_split", 0, "--max_nonfinite_steps", 2, "--epochs", 50, "--save_steps", 1)
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss or gradient" in err and "Traceback" not in err
    from phitune.training import checkpoints
    last = checkpoints.complete(out)[-1]
    weights = load_file(last / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())  # the last good checkpoint is intact


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                               st.sampled_from(["prompt", "response", "completion", "text", "messages", "role",
                                                "content", "instruction", "input", "output", "x"]), inner,
                               max_size=4), max_leaves=12)
lines = st.one_of(json_values.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                  st.text(max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, max_size=6))
def test_reader_loads_or_raises_its_own_error(tmp_path, rows):
    path = tmp_path / "random.jsonl"
    path.write_text("\n".join(rows), encoding="utf-8", errors="surrogateescape")
    try:
        records, fmt = data.read_jsonl(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert records and fmt in data.FORMATS


def test_out_of_memory_retries_with_smaller_micro_batches(tiny_models, tmp_path, capsys, monkeypatch):
    """An OOM (injected for micro-batches over 2 rows) is retried with half the micro-batch, same result."""
    from phitune.training.loss import AnswerLoss
    data_file = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["train", "--model", tiny_models["llama"], "--dataset_path", data_file, "--max_steps", 4, "--batch_size",
            4, "--gradient_accumulation_steps", 1, "--val_split", 0, "--lora_dropout", 0, "--learning_rate", 1e-3,
            "--precision", "fp32"]
    assert run_cli(*args, "--output_dir", tmp_path / "plain") == 0
    real = AnswerLoss.forward

    def small_memory(self, input_ids, attention_mask, labels):
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real(self, input_ids, attention_mask, labels)

    monkeypatch.setattr(AnswerLoss, "forward", small_memory)
    capsys.readouterr()
    assert run_cli(*args, "--output_dir", tmp_path / "oom") == 0
    assert "out of memory at step 1: retrying with micro-batches of 2 and 2x" in capsys.readouterr().err
    a = load_file(tmp_path / "plain/final_adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "oom/final_adapter/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_ctrl_c_saves_and_prints_the_resume_command(tiny_models, tmp_path):
    data_file = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    out = tmp_path / "run"
    cmd = train_cmd(tiny_models, data_file, out)
    cmd[cmd.index("--save_steps") + 1] = "1000"  # only the Ctrl-C checkpoint
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "interrupted at step" in err and "Traceback" not in err
    from phitune.training import checkpoints
    assert checkpoints.complete(out), "no checkpoint saved on Ctrl-C"
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "resuming from" in result.stderr


def broken_copy(src, dst, change):
    import shutil
    shutil.copytree(src, dst)
    change(dst)
    return dst


def test_bad_adapter_directories_get_one_message_each(memorised_adapter, tiny_models, tmp_path, capsys):
    from tiny import build_model_dir
    q = tmp_path / "q.yaml"
    q.write_text("questions: [hello]\n")
    wide = build_model_dir("llama", tmp_path / "wide")
    cfg = json.loads((wide / "config.json").read_text())
    cases = {
        "adapter_model.safetensors is missing": broken_copy(
            memorised_adapter, tmp_path / "missing", lambda d: (d / "adapter_model.safetensors").unlink()),
        "cannot load the adapter": broken_copy(
            memorised_adapter, tmp_path / "corrupt",
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)),
        "written by a newer phitune": broken_copy(
            memorised_adapter, tmp_path / "newer", lambda d: (d / "phitune.json").write_text(
                json.dumps({**json.loads((d / "phitune.json").read_text()), "format_version": 99}))),
    }
    capsys.readouterr()
    for problem, path in cases.items():
        assert run_cli("compare", "--adapter_path", path, "--questions", q) == 2
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # same architecture, other width: a base built with hidden_size 64
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg.update(hidden_size=64, intermediate_size=128)
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})) \
        .save_pretrained(wide)
    capsys.readouterr()
    assert run_cli("compare", "--adapter_path", memorised_adapter, "--model", wide, "--questions", q) == 2
    assert "hidden_size=32, but this base has hidden_size=64" in capsys.readouterr().err


def test_unwritable_output_dir_is_refused_before_training(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data_file = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert run_cli("train", "--model", tiny_models["phi"], "--dataset_path", data_file,
                   "--output_dir", blocker / "run") == 2
    assert "output_dir: cannot write to" in capsys.readouterr().err


def test_a_nonfinite_last_step_still_ends_the_run_with_its_checkpoint(tiny_models, tmp_path, monkeypatch):
    """The run's last step is skipped as non-finite: the run still writes the checkpoint its end calls for."""
    from phitune.training import loop as train_loop
    real = train_loop._step_with_retry

    def nan_on_the_last_step(run, micro, weight, split, step_tokens, step):
        loss, seen, split = real(run, micro, weight, split, step_tokens, step)
        return (loss * float("nan") if step == 3 else loss), seen, split
    monkeypatch.setattr(train_loop, "_step_with_retry", nan_on_the_last_step)
    out = tmp_path / "run"
    code = run_cli("train", "--model", tiny_models["phi"], "--dataset_path", write_jsonl(tmp_path / "d.jsonl", ROWS),
                   "--output_dir", out, "--max_steps", 3, "--batch_size", 4, "--gradient_accumulation_steps", 1,
                   "--val_split", 0)
    assert code == 0
    assert (out / "checkpoint-3").is_dir() and (out / "final_adapter").is_dir()
    weights = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
