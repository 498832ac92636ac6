"""`phitune eval` and `phitune merge` on tiny models."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MEMORISE, run_cli, write_jsonl
from phitune.evaluate import reference_scores, rouge_l


def test_reference_metrics():
    perfect = reference_scores(["the cat sat on the mat today", "a dog runs in the park now"],
                               [["the cat sat on the mat today"], ["the dog walks", "a dog runs in the park now"]])
    assert perfect["bleu"] == pytest.approx(100, abs=1e-6) and perfect["exact_match"] == 100
    assert perfect["rouge_l"] == pytest.approx(100)
    wrong = reference_scores(["zebra zebra", "q"], [["the cat sat on the mat today"], ["a dog runs in the park"]])
    assert wrong["exact_match"] == 0 and wrong["bleu"] < 5
    assert rouge_l("the cat sat on", "the cat on") == pytest.approx(2 * 0.75 * 1.0 / 1.75)


def test_eval_scores_base_and_tuned_with_deltas(memorised_adapter, tmp_path, capsys):
    rows = MEMORISE + [{"prompt": MEMORISE[0]["prompt"], "response": "Another reference for red."}]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "scores.json"
    assert run_cli("eval", "--adapter_path", memorised_adapter, "--data", data, "--output", out,
                   "--max_new_tokens", 16) == 0
    table = capsys.readouterr().out
    assert "answer loss" in table and "BLEU" in table and "run - base" in table
    scores = json.loads(out.read_text())
    base, tuned = scores["results"]["base"], scores["results"]["run"]
    assert scores["questions"] == 4  # two references for the first prompt, one question
    assert tuned["loss"] < base["loss"] and tuned["exact_match"] == 100 and base["exact_match"] == 0
    assert scores["deltas"]["run"]["bleu"] == pytest.approx(tuned["bleu"] - base["bleu"])


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_merge_loads_in_plain_transformers_and_matches(tiny_models, tmp_path, arch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    run = tmp_path / "run"
    assert run_cli("train", "--model", tiny_models[arch], "--dataset_path", data, "--output_dir", run,
                   "--max_steps", 3, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--learning_rate", 0.05,
                   "--val_split", 0) == 0
    merged = tmp_path / "merged"
    assert run_cli("merge", "--adapter_path", run / "final_adapter", "--output_dir", merged) == 0
    out = capsys.readouterr().out
    assert "check: max |logit difference|" in out
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    from phitune.generation import load as gen
    loaded = gen.load([run / "final_adapter"], precision="fp32")
    ids = torch.tensor([loaded.template.encode_prompt([{"role": "user", "content": MEMORISE[1]["prompt"]}])])
    with torch.no_grad(), loaded.use(loaded.first_adapter):
        want = loaded.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if arch != "phi":
        assert tok.chat_template  # chat template travels with the merged model
    assert model.generation_config.eos_token_id == loaded.template.stop_token_ids()


def test_merge_refuses_quantized_base(tmp_path, tiny_models, memorised_adapter, capsys):
    base = tmp_path / "quantized"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(base)
    assert run_cli("merge", "--adapter_path", memorised_adapter, "--model", base, "--output_dir", tmp_path / "m") == 2
    assert "stored quantized" in capsys.readouterr().err
