"""Preference data outside training: `phitune eval --data PAIRS` and `phitune data inspect PAIRS`."""
import json

import pytest
import torch

from conftest import MEMORISE, run_cli, write_jsonl

# the memorised answers as chosen, near misses (a wrong code) as rejected
PAIRS = [{"prompt": m["prompt"], "chosen": m["response"], "rejected": m["response"].replace(code, wrong)}
         for m, code, wrong in zip(MEMORISE, ("one", "two", "three", "four"), ("two", "three", "four", "one"))]


def _conversational(row):
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def _summed_logp(model, template, prompt, answer):
    """Log-likelihood of `answer` (with its end-of-turn token) after `prompt`, summed over its tokens, by hand."""
    ids, labels = template.encode({"messages": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": answer}]})
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    lp = logits.log_softmax(-1)
    return sum(lp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def test_eval_on_pairs_reports_preference_accuracy_and_margin_with_deltas(memorised_adapter, tmp_path, capsys):
    # a second pair for red with another near miss: red's chosen answer is one question with one reference
    rows = PAIRS + [{**PAIRS[0], "rejected": "The code for red is on."}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scores.json"
    assert run_cli("eval", "--adapter_path", memorised_adapter, "--data", data, "--output", out,
                   "--max_new_tokens", 16, "--precision", "fp32") == 0
    table = capsys.readouterr().out
    assert "preference accuracy" in table and "margin" in table and "exact match %" in table
    scores = json.loads(out.read_text())
    base, tuned = scores["results"]["base"], scores["results"]["run"]
    assert tuned["pairs"] == base["pairs"] == 5 and scores["questions"] == 4
    # the adapter memorised every chosen answer: it prefers each one to its near miss
    assert tuned["preference_accuracy"] == 1.0 and tuned["margin"] > 0
    assert scores["deltas"]["run"]["margin"] == pytest.approx(tuned["margin"] - base["margin"])
    assert scores["deltas"]["run"]["margin"] > 0
    assert scores["deltas"]["run"]["preference_accuracy"] == pytest.approx(1.0 - base["preference_accuracy"])
    # the usual metrics are computed on the chosen answers (each chosen answer once)
    assert tuned["loss"] < base["loss"] and tuned["exact_match"] == 100 and base["exact_match"] == 0
    assert tuned["samples"][0]["reference"] == PAIRS[0]["chosen"]

    # margin = mean over pairs of the summed log-likelihood of chosen minus rejected, under the base model
    from phitune.generation import load as gen
    loaded = gen.load([str(memorised_adapter)], precision="fp32")
    template = loaded.template_for(None)
    with loaded.use(None):
        diffs = [_summed_logp(loaded.model, template, r["prompt"], r["chosen"])
                 - _summed_logp(loaded.model, template, r["prompt"], r["rejected"]) for r in rows]
    assert base["margin"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3)
    assert base["preference_accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))


def test_eval_reads_trl_conversational_pairs_without_generation(memorised_adapter, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [_conversational(r) for r in PAIRS])
    out = tmp_path / "scores.json"
    assert run_cli("eval", "--adapter_path", memorised_adapter, "--data", data, "--output", out,
                   "--no_generate", "--limit", 2) == 0
    scores = json.loads(out.read_text())
    tuned = scores["results"]["run"]
    assert tuned["pairs"] == 2 and tuned["preference_accuracy"] == 1.0 and "exact_match" not in tuned
    assert "preference accuracy" in capsys.readouterr().out


def test_eval_on_bad_pairs_is_exit_2_naming_the_line(memorised_adapter, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2] + [{**PAIRS[2], "rejected": PAIRS[2]["chosen"]}])
    assert run_cli("eval", "--adapter_path", memorised_adapter, "--data", data, "--no_generate") == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:3:" in err and "same answer" in err


def test_inspect_pairs_marks_both_answers(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert run_cli("data", "inspect", data, "--model", tiny_models["llama"], "--examples", 2) == 0
    out = capsys.readouterr().out
    assert "record format  preference" in out and "records        4 pairs" in out
    assert out.count("--- ") == 2
    # the prompt once, then each answer with its trained tokens (end-of-turn included) marked
    first = out[out.index("--- first"):]
    assert first.count("Say the code for red") == 1
    assert "chosen   ⟦The code for red is one.<|im_end|>⟧" in first
    assert "rejected ⟦The code for red is two.<|im_end|>⟧" in first
    assert "preference pairs" in out and "min " in out


def test_inspect_pairs_without_model_counts_characters(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [_conversational(r) for r in PAIRS])
    assert run_cli("data", "inspect", data) == 0
    out = capsys.readouterr().out
    assert "record format  preference_conversational" in out and "records        4 pairs" in out
    assert "characters per pair" in out


def test_inspect_bad_pairs_is_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a"}])
    assert run_cli("data", "inspect", data) == 2
    assert "'rejected' is missing" in capsys.readouterr().err
