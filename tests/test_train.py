"""The real `phitune train` CLI on tiny random models: files, learning, stopping, reloading, resuming."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MEMORISE, ROOT, run_cli, write_jsonl

FAST = ["--batch_size", 4, "--gradient_accumulation_steps", 1, "--max_length", 64, "--lora_r", 8,
        "--lora_dropout", 0.0, "--learning_rate", 3e-2, "--warmup_ratio", 0.0, "--val_split", 0]


def lora_tensors(path):
    return load_file(path / "adapter_model.safetensors")


def test_train_writes_adapter_and_every_lora_weight_changes(tiny_models, arch, memorise_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli("train", "--model", tiny_models[arch], "--dataset_path", memorise_file, "--output_dir", out,
                   "--epochs", 3, *FAST, "--lora_dropout", 0.1)
    assert code == 0
    from phitune.models.loading import cpu_has_fast_bf16
    if cpu_has_fast_bf16():  # bf16 compute on this CPU: every LoRA layer takes the fused path
        import re
        found = re.search(r"(\d+) of (\d+) LoRA layers on phitune's fused CPU path", capsys.readouterr().err)
        assert found and found[1] == found[2] and int(found[1]) >= 8
    final = out / "final_adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "phitune.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint-3" / "optimizer.pt").is_file()
    meta = json.loads((final / "phitune.json").read_text())
    assert meta["base"]["model_type"] == arch and meta["data"]["format"] == "prompt_response"
    assert meta["template"]["kind"] == ("phi2" if arch == "phi" else "chat")
    assert meta["training"]["lora_r"] == 8 and meta["metrics"]["steps"] == 3
    # LoRA B starts at zero and A at a seeded random init: both must have moved
    from transformers import AutoModelForCausalLM

    from phitune.config import LoraArgs
    from phitune.models import adapters
    init, _ = adapters.attach_lora(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), LoraArgs(), seed=42)
    init = {k: v for k, v in init.state_dict().items() if "lora_" in k}
    trained = lora_tensors(final)
    assert len(trained) == len(init) > 0
    for key, value in trained.items():
        start = next(v for k, v in init.items() if k.replace(".default", "") == key)
        assert not torch.allclose(value, start), f"{key} did not change"
    assert not any("embed" in k for k in trained)  # a small adapter: no embedding matrices


def test_loss_falls_and_tuned_model_stops_by_itself(tiny_models, memorise_file, tmp_path):
    """Memorise four answers: the loss drops and greedy decoding reproduces each answer, then stops at EOS."""
    out = tmp_path / "run"
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", memorise_file, "--output_dir", out,
                   "--epochs", 60, *FAST, "--target_modules", "all", "--lora_r", 16) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.1 * losses[0], losses
    from phitune.generation import load as gen
    loaded = gen.load([out / "final_adapter"])
    answers = gen.generate(loaded, [[{"role": "user", "content": r["prompt"]}] for r in MEMORISE],
                           gen.Sampling(max_new_tokens=40), adapter=loaded.first_adapter)
    for row, answer in zip(MEMORISE, answers):
        assert answer.text == row["response"] and answer.stopped and answer.tokens < 40


def test_resume_after_crash_gives_the_same_adapter(tiny_models, memorise_file, tmp_path):
    args = ["--model", tiny_models["phi3"], "--dataset_path", memorise_file, "--epochs", 6, *FAST,
            "--batch_size", 2, "--save_steps", 2, "--save_total_limit", 3, "--lora_dropout", 0.1]
    full = tmp_path / "full"
    assert run_cli("train", *args, "--output_dir", full) == 0
    # What a crash after step 8's checkpoint leaves behind: checkpoints up to 8, a half-written one, no final.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "final_adapter")
    shutil.rmtree(crashed / "checkpoint-12")
    shutil.rmtree(crashed / "checkpoint-10")
    (crashed / ".checkpoint-10.tmp").mkdir()
    assert run_cli("train", *args, "--output_dir", crashed) == 2  # refuses to overwrite without --resume
    assert run_cli("train", *args, "--output_dir", crashed, "--resume") == 0
    a, b = lora_tensors(full / "final_adapter"), lora_tensors(crashed / "final_adapter")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(r)["step"] for r in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) == len(set(steps))


def test_validation_best_adapter_and_early_stopping(tiny_models, tmp_path):
    rows = [{"prompt": f"item {i}", "response": f"value {i % 3}"} for i in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert run_cli("train", "--model", tiny_models["phi"], "--dataset_path", data, "--output_dir", out,
                   "--epochs", 30, *FAST, "--val_split", 0.2, "--eval_steps", 1, "--learning_rate", 0.3,
                   "--early_stopping_patience", 2) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    meta = json.loads((out / "final_adapter" / "phitune.json").read_text())
    assert meta["metrics"]["steps"] < 30 * 4  # stopped early
    best = min(evals, key=lambda r: r["val_loss"])
    assert meta["metrics"]["best_step"] == best["step"] and meta["selected"] == "best validation loss"
    torch.testing.assert_close(lora_tensors(out / "final_adapter"), lora_tensors(out / "best_adapter"))


def test_config_yaml_with_flags_winning(tiny_models, memorise_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_models['phi']}\ndataset_path: {memorise_file}\nlora_r: 4\nepochs: 1\n"
                   f"max_steps: 1\nval_split: 0\ntarget_modules: [fc1, fc2]\n")
    out = tmp_path / "run"
    assert run_cli("train", "--config", cfg, "--output_dir", out, "--lora_r", 2) == 0
    meta = json.loads((out / "final_adapter" / "phitune.json").read_text())
    assert meta["training"]["lora_r"] == 2 and meta["training"]["target_modules"] == ["fc1", "fc2"]
    assert meta["lora"]["trainable_parameters"] == 2 * 2 * ((32 + 64) + (64 + 32))


@pytest.mark.parametrize("args,message", [
    (["--learning_rate", "-1"], "learning_rate: must be a positive number"),
    (["--lora_alpha", "0"], "lora_alpha: must be > 0"),
    (["--max_length", "99999"], "max_length: 99999 is beyond this model's context of 2048"),
    (["--target_modules", "Wqkv"], "Wqkv matches no linear layer"),
    (["--layers", "7"], "outside this model's layers 0-1"),
])
def test_bad_settings_exit_2_with_one_line(tiny_models, memorise_file, tmp_path, capsys, args, message):
    code = run_cli("train", "--model", tiny_models["phi"], "--dataset_path", memorise_file,
                   "--output_dir", tmp_path / "o", *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    assert run_cli("train", "--config", cfg) == 2
    assert "lerning_rate: unknown key; did you mean learning_rate?" in capsys.readouterr().err


def test_offline_hub_id_names_offline_choices(tmp_path, memorise_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run_cli("train", "--model", "microsoft/phi-2", "--dataset_path", memorise_file, "--output_dir", tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "cannot load 'microsoft/phi-2'" in err and "smollm2-135m-instruct" in err
    assert len(err.strip().splitlines()) == 1


def test_seed_entry_point_trains(tiny_models, memorise_file, tmp_path):
    """`python src/main.py` with the seed's flags runs the same training, in a fresh process."""
    out = tmp_path / "seed"
    result = subprocess.run([sys.executable, str(ROOT / "src" / "main.py"), "--model", str(tiny_models["phi"]),
                             "--dataset_path", str(memorise_file), "--output_dir", str(out), "--batch_size", "2",
                             "--epochs", "1", "--gradient_accumulation_steps", "2", "--max_length", "64",
                             "--learning_rate", "2e-4", "--warmup_ratio", "0.05", "--lora_r", "8", "--lora_alpha",
                             "32", "--lora_dropout", "0.05", "--no-gradient_checkpointing", "--no-torch_compile",
                             "--val_split", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()
    assert "trainable parameters:" in result.stderr and "phitune chat --adapter_path" in result.stderr


def test_bad_data_via_cli_is_one_clear_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": "b"}', "{oops"])
    assert run_cli("train", "--model", "smollm2-135m-instruct", "--dataset_path", bad, "--output_dir", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"phitune train: error: {bad}:2: invalid JSON (Expecting property name enclosed in double quotes " \
                  f"at column 2)"
