"""Corners of preference tuning and of the server found by a review: each a user would hit."""
import json
import math
import os

import pytest

from conftest import run_cli, write_jsonl
from phitune.data import pairs
from phitune.errors import DataError

PAIRS = [{"prompt": f"Say the code for {name}", "chosen": f"The code for {name} is {code}.",
          "rejected": f"The code for {name} is {wrong}."}
         for name, code, wrong in [("red", "one", "two"), ("blue", "two", "three"), ("green", "three", "one"),
                                   ("gold", "four", "five")]]
TRAIN = ["--max_length", 64, "--lora_r", 4, "--learning_rate", 1e-2, "--warmup_ratio", 0, "--val_split", 0,
         "--batch_size", 2, "--gradient_accumulation_steps", 1, "--gradient_checkpointing", "false"]


def _sft_then_dpo_checkpoint(tiny_models, tmp_path):
    sft = tmp_path / "sft"
    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in PAIRS]
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", write_jsonl(tmp_path / "s.jsonl", rows),
                   "--output_dir", sft, "--max_steps", 2, *TRAIN) == 0
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    dpo = tmp_path / "dpo"
    assert run_cli("train", "--method", "dpo", "--adapter_path", sft / "final_adapter", "--dataset_path", data,
                   "--output_dir", dpo, "--max_steps", 2, "--save_steps", 1, *TRAIN) == 0
    return sft, data, dpo


def test_resume_accepts_the_same_start_adapter_spelled_another_way(tiny_models, tmp_path, capfd, monkeypatch):
    sft, data, dpo = _sft_then_dpo_checkpoint(tiny_models, tmp_path)
    capfd.readouterr()
    monkeypatch.chdir(tmp_path)
    code = run_cli("train", "--method", "dpo", "--adapter_path", os.path.relpath(sft / "final_adapter"),
                   "--dataset_path", data, "--output_dir", dpo, "--max_steps", 3, "--resume", *TRAIN)
    err = capfd.readouterr().err
    assert code == 0, err
    assert "read back" in err


def test_resume_with_another_method_is_refused_naming_both(tiny_models, tmp_path, capfd):
    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in PAIRS]
    out = tmp_path / "run"
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", write_jsonl(tmp_path / "s.jsonl", rows),
                   "--output_dir", out, "--max_steps", 2, "--save_steps", 1, *TRAIN) == 0
    capfd.readouterr()
    code = run_cli("train", "--model", tiny_models["llama"], "--method", "dpo", "--dataset_path",
                   write_jsonl(tmp_path / "p.jsonl", PAIRS), "--output_dir", out, "--max_steps", 3, "--resume", *TRAIN)
    err = capfd.readouterr().err
    assert code == 2, err
    assert "--method sft" in err and "--method dpo" in err and "Traceback" not in err


def test_a_request_after_close_ends_at_once(tiny_models):
    from phitune.generation import load as gen
    from phitune.generation.engine import Engine
    from phitune.generation.scheduler import Busy, Scheduler
    loaded = gen.load(model=str(tiny_models["llama"]), precision="fp32")
    scheduler = Scheduler(Engine(loaded), max_batch=2, max_queue=4)
    scheduler.close()
    request = loaded.request(loaded.template_for(None).encode_prompt([{"role": "user", "content": "hi"}]), None,
                             gen.Sampling(max_new_tokens=4))
    with pytest.raises(Busy, match="shutting down"):
        scheduler.submit(request)


def test_top_level_system_of_a_conversational_pair_is_its_system_turn(tmp_path):
    conv = {"system": "Answer in French.", "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "salut"}],
            "rejected": [{"role": "assistant", "content": "hello"}]}
    got, _ = pairs.read_pairs(str(write_jsonl(tmp_path / "c.jsonl", [conv])))
    assert got[0]["prompt"][0] == {"role": "system", "content": "Answer in French."}
    both = dict(conv, prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    with pytest.raises(DataError, match=r"c2.jsonl:1.*system"):
        pairs.read_pairs(str(write_jsonl(tmp_path / "c2.jsonl", [both])))


def test_implicit_pairs_that_differ_before_their_answers_are_told_so(tmp_path):
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="same conversation up to their final assistant answer"):
        pairs.read_pairs(str(write_jsonl(tmp_path / "i.jsonl", [row])))


def test_a_nan_logprob_is_written_as_a_finite_number():
    from phitune.serving import logprobs
    assert math.isfinite(logprobs._finite(float("nan")))
    json.dumps(logprobs._finite(float("nan")), allow_nan=False)
