"""Preference tuning (--method dpo | orpo): data, losses equal to TRL's, training, resume, bad input."""
import csv
import json

import pytest

from conftest import write_jsonl
from phitune.data import pairs
from phitune.data.templates import IGNORE, Template
from phitune.errors import DataError
from tiny import build_tokenizer

PAIRS = [{"prompt": f"Say the code for {name}", "chosen": f"The code for {name} is {code}.",
          "rejected": f"The code for {name} is {wrong}."}
         for name, code, wrong in [("red", "one", "two"), ("blue", "two", "three"), ("green", "three", "four"),
                                   ("gold", "four", "one")]]


# ---------------------------------------------------------------- data

def _conversation(row):
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def test_standard_conversational_and_implicit_forms_read_the_same(tmp_path):
    standard, fmt = pairs.read_pairs(write_jsonl(tmp_path / "s.jsonl", PAIRS))
    assert fmt == "preference" and len(standard) == 4
    assert standard[0] == {"prompt": [{"role": "user", "content": "Say the code for red"}],
                           "chosen": "The code for red is one.", "rejected": "The code for red is two."}
    conversational, fmt = pairs.read_pairs(write_jsonl(tmp_path / "c.jsonl", [_conversation(r) for r in PAIRS]))
    assert fmt == "preference_conversational" and conversational == standard
    implicit = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
                for c in map(_conversation, PAIRS)]
    assert pairs.read_pairs(write_jsonl(tmp_path / "i.jsonl", implicit))[0] == standard


def test_columns_map_csv_and_parquet_sources(tmp_path):
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "good", "bad"])
        w.writerows([r["prompt"], r["chosen"], r["rejected"]] for r in PAIRS)
    got, _ = pairs.read_pairs(tmp_path / "p.csv", columns="prompt=question,chosen=good,rejected=bad")
    want, _ = pairs.read_pairs(write_jsonl(tmp_path / "s.jsonl", PAIRS))
    assert got == want
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    conv = [_conversation(r) for r in PAIRS]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "c.parquet")
    assert pairs.read_pairs(tmp_path / "c.parquet")[0] == want


@pytest.mark.parametrize("bad,problem", [
    ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
    ({"prompt": "p", "rejected": "a"}, "'chosen' is missing"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same answer"),
    ({"prompt": "p", "chosen": 3, "rejected": "a"}, "'chosen' must be a string"),
    ({"prompt": ["p"], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0] must be an object"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'chosen' must hold one assistant message"),
    ({"prompt": "p", "response": "r"}, "--method sft"),
])
def test_bad_pair_names_file_line_and_field(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], bad])
    with pytest.raises(DataError) as err:
        pairs.read_pairs(path)
    assert f"{path}:2: " in str(err.value) and problem in str(err.value), str(err.value)


def test_sft_reader_points_preference_data_to_dpo(tmp_path):
    from phitune.data import records
    with pytest.raises(DataError, match="--method dpo or --method orpo"):
        records.read_records(write_jsonl(tmp_path / "p.jsonl", PAIRS))


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_pair_shares_prompt_ids_and_trains_each_answer_as_sft_does(arch):
    tok = build_tokenizer(arch)
    template = Template(tok)
    pair = {"prompt": [{"role": "user", "content": "Say hello"}], "chosen": "Hello there!", "rejected": "Bye."}
    ex = pairs.encode_pair(pair, template)
    n = ex["prompt_len"]
    assert n == len(template.encode_prompt(pair["prompt"]))
    assert ex["chosen"]["input_ids"][:n] == ex["rejected"]["input_ids"][:n]
    for key in ("chosen", "rejected"):  # the same ids and answer labels as a supervised example of that answer
        ids, labels = template.encode({"messages": pair["prompt"] + [{"role": "assistant", "content": pair[key]}]})
        assert ex[key]["input_ids"] == ids and ex[key]["labels"] == labels
        assert ex[key]["labels"][:n] == [IGNORE] * n
        assert ex[key]["labels"][-1] == tok.convert_tokens_to_ids(template.end_of_turn) or \
            ex[key]["labels"][-1] == tok.eos_token_id  # the end-of-turn token is trained
    batch = pairs.collate_pairs([ex, ex], tok.pad_token_id or 0)
    assert batch["input_ids"].shape[0] == 4  # rows: chosen, chosen, rejected, rejected
    assert batch["input_ids"][0].tolist()[:n] == batch["input_ids"][2].tolist()[:n]


def test_multi_turn_prompt_trains_only_the_final_answer():
    tok = build_tokenizer("llama")
    template = Template(tok)
    prompt = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
              {"role": "user", "content": "three"}]
    ex = pairs.encode_pair({"prompt": prompt, "chosen": "four", "rejected": "five"}, template)
    trained = [i for i, label in zip(ex["chosen"]["input_ids"], ex["chosen"]["labels"]) if label != IGNORE]
    assert tok.decode(trained) == "four" + template.end_of_turn


def test_long_pairs_follow_max_length():
    template = Template(build_tokenizer("phi"))
    long = {"prompt": [{"role": "user", "content": "Say hello"}], "chosen": "Hello there! " * 20, "rejected": "Bye."}
    short = {"prompt": [{"role": "user", "content": "Say hello"}], "chosen": "Hi.", "rejected": "Bye."}
    kept, stats = pairs.encode_pairs([long, short], template, 24)
    assert stats.kept == 2 and stats.truncated == 1 and all(
        len(s["input_ids"]) <= 24 for e in kept for s in (e["chosen"], e["rejected"]))
    kept, stats = pairs.encode_pairs([long, short], template, 24, long_examples="drop")
    assert stats.kept == 1 and stats.dropped == 1
    assert "1 preference pairs" in stats.report("train")


def test_json_in_csv_cells_reads_as_conversational(tmp_path):
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "chosen", "rejected"])
        for c in map(_conversation, PAIRS):
            w.writerow([json.dumps(c["prompt"]), json.dumps(c["chosen"]), json.dumps(c["rejected"])])
    got, fmt = pairs.read_pairs(tmp_path / "c.csv")
    assert fmt == "preference_conversational" and got[0]["chosen"] == PAIRS[0]["chosen"]
