"""Data as it comes: JSON arrays, CSV, Parquet, `datasets` directories and ids, column mapping, `data inspect`."""
import json
import re

import pytest

from conftest import run_cli
from phitune.data import records as data
from phitune.data.sources import detect_kind
from phitune.errors import ConfigError, DataError

PAIRS = [{"question": "What is two plus two?", "answer": "Four."},
         {"question": "Name a colour", "answer": "Blue, or\nperhaps red"},
         {"question": "Capital of France?", "answer": "Paris."}]
EXPECTED = [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
            for p in PAIRS]
MAP = "prompt=question,response=answer"


def _csv(path, rows, delimiter=","):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _saved(path, rows, splits=None):
    import datasets
    if splits:
        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _json(path, rows):
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


@pytest.mark.parametrize("make,name,kind", [
    (_json, "d.json", "json"), (_csv, "d.csv", "csv"), (lambda p, r: _csv(p, r, "\t"), "d.tsv", "tsv"),
    (_parquet, "d.parquet", "parquet"), (_saved, "saved", "saved"),
])
def test_every_format_reads_the_same_records(tmp_path, make, name, kind):
    path = make(tmp_path / name, PAIRS)
    assert detect_kind(path) == kind
    records, fmt = data.read_records(path, columns=MAP)
    assert fmt == "prompt_response"
    assert [r["messages"] for r in records] == EXPECTED


def test_json_file_holding_json_lines_reads_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("\n".join(json.dumps({"prompt": p["question"], "response": p["answer"]}) for p in PAIRS))
    assert detect_kind(path) == "jsonl"
    assert [r["messages"] for r in data.read_records(path)[0]] == EXPECTED


def test_saved_dataset_dict_picks_the_split(tmp_path):
    path = _saved(tmp_path / "dd", None, splits={"train": PAIRS[:2], "test": PAIRS[2:]})
    assert [r["messages"] for r in data.read_records(path, "test", MAP)[0]] == EXPECTED[2:]
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test.*--dataset_split"):
        data.read_records(path, "validation", MAP)


def test_directory_of_data_files_reads_through_datasets(tmp_path):
    """The route a Hub id takes (datasets.load_dataset), from a local directory since tests have no network."""
    root = tmp_path / "local_hub_copy"
    (root / "data").mkdir(parents=True)
    _parquet(root / "data" / "train-00000.parquet", PAIRS)
    assert detect_kind(root) == "datasets"
    records, fmt = data.read_records(root, "train", MAP)
    assert [r["messages"] for r in records] == EXPECTED


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets
    import huggingface_hub
    # offline mode is read when these libraries are imported; an earlier test may have imported them
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert detect_kind("someorg/some-dataset") == "hub"
    with pytest.raises(DataError, match="someorg/some-dataset: is not a local file or directory, and cannot load "
                                        "the dataset from the Hub.*offline"):
        data.read_records("someorg/some-dataset")


def test_sharegpt_conversations_are_mapped(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}]}]
    records, fmt = data.read_records(_json(tmp_path / "sg.json", rows), columns="messages=conversations")
    assert fmt == "messages"
    assert records[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello."}]
    bad = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]}]
    with pytest.raises(DataError, match=r"sg2.json:item 0: messages\[1\].from is 'robot'.*human"):
        data.read_records(_json(tmp_path / "sg2.json", bad), columns="messages=conversations")


def test_messages_stored_as_json_text_in_a_csv_cell(tmp_path):
    cell = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    records, fmt = data.read_records(_csv(tmp_path / "m.csv", [{"messages": cell}]))
    assert fmt == "messages" and records[0]["messages"][1]["content"] == "Hello."


@pytest.mark.parametrize("spec,problem", [
    ("prompt", "'prompt' is not FIELD=COLUMN"),
    ("promt=question", "'promt' is not a phitune field (did you mean prompt?)"),
    ("prompt=a,prompt=b", "'prompt' is mapped twice"),
])
def test_bad_column_specs_are_config_errors(spec, problem):
    from phitune.config import DataArgs
    with pytest.raises(ConfigError, match="columns: " + re.escape(problem)):
        DataArgs(columns=spec)


def test_mapping_errors_name_file_row_and_source_column(tmp_path):
    rows = PAIRS[:1] + [{"question": "Q", "answer": ""}]
    csv_path = _csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as err:
        data.read_records(csv_path, columns=MAP)
    # the CSV header is line 1, so the second record starts on line 3
    assert str(err.value) == f"{csv_path}:3: 'answer' (--columns response=answer) is empty"
    with pytest.raises(DataError, match=r"bad.csv:2: column 'answr' named in --columns is missing \(did you mean "
                                        r"'answer'\?\)"):
        data.read_records(csv_path, columns="prompt=question,response=answr")
    pq_path = _parquet(tmp_path / "bad.parquet", PAIRS[:2] + [{"question": None, "answer": "A"}])
    with pytest.raises(DataError, match=r"bad.parquet:row 2: 'question' \(--columns prompt=question\) is missing "
                                        r"\(null\)"):
        data.read_records(pq_path, columns=MAP)
    with pytest.raises(DataError, match=r"d.json:item 1: no known record format in keys \['answer', 'question'\]"):
        data.read_records(_json(tmp_path / "d.json", [{"prompt": "p", "response": "r"}] + PAIRS))


def test_bad_files_of_each_kind(tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": "a", ')
    (tmp_path / "ragged.csv").write_text('prompt,response\n"a","b","c"\n')
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    (tmp_path / "empty").mkdir()
    for name, problem in [("broken.json", "invalid JSON"), ("ragged.csv", r"ragged.csv:2: 3 cells but the header"),
                          ("junk.parquet", "not a readable Parquet file"), ("empty", "no data files"),
                          ("missing.csv", "file not found")]:
        with pytest.raises(DataError, match=problem):
            data.read_records(tmp_path / name)


def test_train_reads_csv_with_columns(tiny_models, tmp_path):
    path = _csv(tmp_path / "qa.csv", PAIRS * 2)
    out = tmp_path / "run"
    code = run_cli("train", "--model", tiny_models["llama"], "--dataset_path", path, "--columns", MAP,
                   "--output_dir", out, "--max_steps", 1, "--batch_size", 2, "--gradient_accumulation_steps", 1,
                   "--max_length", 64, "--val_split", 0)
    assert code == 0
    meta = json.loads((out / "final_adapter" / "phitune.json").read_text())
    assert meta["data"]["format"] == "prompt_response" and meta["data"]["train_examples"] == 6


def test_inspect_shows_format_lengths_truncation_and_marked_examples(tiny_models, tmp_path, capsys):
    from phitune.data.templates import Template
    from phitune.models.loading import load_tokenizer
    rows = PAIRS + [{"question": "Tell a long story", "answer": " ".join(["one two three four five"] * 20)}]
    path = _parquet(tmp_path / "qa.parquet", rows)
    assert run_cli("data", "inspect", path, "--columns", MAP, "--model", tiny_models["phi3"], "--max_length", 40) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(str(tiny_models["phi3"]))
    template = Template(tok)
    lengths = [len(template.encode(r)[0]) for r in data.read_records(path, columns=MAP)[0]]
    over = sum(n > 40 for n in lengths)
    assert over == 1
    assert "source         parquet" in out and "record format  prompt_response" in out and "records        4" in out
    assert f"min {min(lengths)}," in out and f"max {max(lengths)}" in out
    assert "<- --max_length" in out
    assert f"longer than 40  {over} (25.0%): 1 would be truncated" in out
    # three examples; the answer (with its end-of-turn token) is marked as trained, the prompt is not
    assert out.count("--- ") == 3
    assert "⟦Four.<|end|>⟧" in out and "What is two plus two?<|end|>" in out
    assert "⟦What is" not in out
    assert "cut at --max_length 40" in out


def test_inspect_without_model_counts_characters(tmp_path, capsys):
    path = _json(tmp_path / "d.json", [{"prompt": "ab", "response": "cde"}, {"prompt": "x", "response": "y"}])
    assert run_cli("data", "inspect", path) == 0
    out = capsys.readouterr().out
    assert "source         json" in out and "min 2, median 4, p95 5, max 5" in out


def test_inspect_bad_data_is_exit_2(tmp_path, capsys):
    path = _csv(tmp_path / "q.csv", PAIRS)
    assert run_cli("data", "inspect", path, "--columns", "prompt=question,response=answr") == 2
    assert "column 'answr' named in --columns is missing" in capsys.readouterr().err


def test_sharegpt_without_columns_points_to_the_mapping(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    for path in (_json(tmp_path / "sg.json", rows), tmp_path / "sg.jsonl"):
        path.write_text(json.dumps(rows) if path.suffix == ".json" else json.dumps(rows[0]) + "\n")
        with pytest.raises(DataError) as err:
            data.read_records(path)
        msg = str(err.value)
        assert "--columns messages=conversations" in msg and "did you mean" not in msg, msg


def test_pretty_printed_single_object_asks_for_an_array(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"prompt": "p", "response": "r"}, indent=2))
    with pytest.raises(DataError, match=r"one.json: holds one JSON object; expected an array of records "
                                        r"\(\[\{\.\.\.\}, \{\.\.\.\}\]\) or JSON lines"):
        data.read_records(one)
    pretty_array = tmp_path / "arr.jsonl"
    pretty_array.write_text(json.dumps([{"prompt": "p", "response": "r"}], indent=2))
    with pytest.raises(DataError, match=r"arr.jsonl: holds a JSON array, not JSON lines; name it .json"):
        data.read_records(pretty_array)


def test_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,response\na,b\nc,d\n\"caf\xe9\",e\n")
    with pytest.raises(DataError, match=r"latin1.csv:4: not valid UTF-8 at byte 5 of the line"):
        data.read_records(path)


LONG_ROWS = PAIRS + [{"question": "Tell a long story", "answer": " ".join(["one two three four five"] * 20)},
                     {"question": " ".join(["a long question"] * 30), "answer": "Short."}]


def _encoded(tiny_models, path, max_length, long_examples):
    from phitune.data.templates import Template
    from phitune.models.loading import load_tokenizer
    template = Template(load_tokenizer(str(tiny_models["phi3"])))
    return data.encode_records(data.read_records(path, columns=MAP)[0], template, max_length,
                               long_examples=long_examples)[1]


@pytest.mark.parametrize("long_examples", ["truncate", "drop"])
def test_inspect_counts_tokens_as_training_will_see_them(tiny_models, tmp_path, capsys, long_examples):
    path = _parquet(tmp_path / "qa.parquet", LONG_ROWS)
    assert run_cli("data", "inspect", path, "--columns", MAP, "--model", tiny_models["phi3"], "--max_length", 40,
                   "--long_examples", long_examples) == 0
    out = capsys.readouterr().out
    stats = _encoded(tiny_models, path, 40, long_examples)
    assert re.search(rf"\n  tokens +{stats.tokens:,} \({stats.answer_tokens:,} trained\)", out), out
    if long_examples == "drop":
        assert "longer than 40  2 (40.0%): 2 would be dropped (--long_examples drop)" in out
        assert "cut at --max_length" not in out and "dropped by --long_examples drop" in out
    else:
        assert "longer than 40  2 (40.0%): 1 would be truncated" in out


def test_inspect_takes_a_training_config(tiny_models, tmp_path, capsys):
    path = _parquet(tmp_path / "qa.parquet", LONG_ROWS)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_models['phi3']}\ndataset_path: {path}\ncolumns: {MAP}\nmax_length: 40\n"
                   f"long_examples: drop\nbatch_size: 2\noutput_dir: {tmp_path / 'run'}\nlearning_rate: 1e-3\n")
    assert run_cli("data", "inspect", "--config", cfg, "--examples", 1) == 0
    out = capsys.readouterr().out
    stats = _encoded(tiny_models, path, 40, "drop")
    assert re.search(rf"\n  tokens +{stats.tokens:,} \({stats.answer_tokens:,} trained\)", out), out
    assert out.count("--- ") == 1
    cfg.write_text("max_lenght: 40\n")
    assert run_cli("data", "inspect", path, "--config", cfg) == 2
    assert "max_lenght: unknown key; did you mean max_length?" in capsys.readouterr().err


def test_inspect_help_and_flags_match_train(capsys):
    assert run_cli("data", "inspect", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 1024)", "(default: truncate)", "--long_examples {truncate,drop}",
                  "--train_on_prompt, --no_train_on_prompt", "--trust_remote_code, --no_trust_remote_code",
                  "--config CONFIG"):
        assert shown in text, shown
