"""Two data-parallel CPU processes (gloo) train the same adapter as one process with the same effective batch."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import MEMORISE, run_cli, write_jsonl

COMMON = ["--max_length", 64, "--lora_r", 4, "--lora_dropout", 0.0, "--learning_rate", 1e-2, "--warmup_ratio", 0,
          "--val_split", 0.25, "--epochs", 3, "--batch_size", 2, "--no-gradient_checkpointing"]


def test_two_processes_match_one(tiny_models, tmp_path, capsys):
    rows = MEMORISE + [{"prompt": f"Extra question {i}", "response": f"Extra answer {i}."} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", tiny_models["phi3"], "--dataset_path", data, *COMMON]
    assert run_cli("train", *args, "--output_dir", one, "--gradient_accumulation_steps", 2) == 0
    # effective batch 2 x 1 x 2 processes = 2 x 2 x 1 process
    assert run_cli("train", *args, "--output_dir", two, "--gradient_accumulation_steps", 1,
                   "--num_processes", 2) == 0
    a = load_file(one / "final_adapter/adapter_model.safetensors")
    b = load_file(two / "final_adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    loss = lambda d: [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    la, lb = loss(one), loss(two)
    assert len(la) == len(lb) == 9  # 6 batches of 2 per epoch, 2 per step, 3 epochs; logged once (main process)
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-3)
    assert sorted(p.name for p in two.iterdir() if p.name.endswith("adapter")) == ["best_adapter", "final_adapter"]


def test_quantize_refused_off_cuda(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", tmp_path / "o",
                   "--quantize", "4bit") == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU; this run is on cpu" in err and "Traceback" not in err
