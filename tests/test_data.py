"""Reading, validating, templating, masking and batching training data."""
import pytest

from conftest import write_jsonl
from phitune.data import records as data
from phitune.data.templates import Template
from phitune.errors import DataError
from phitune.models.loading import prepare_tokenizer
from tiny import build_tokenizer


@pytest.mark.parametrize("row,fmt,user,assistant", [
    ({"prompt": "P", "response": "R"}, "prompt_response", "P", "R"),
    ({"prompt": "P", "completion": "C"}, "prompt_completion", "P", "C"),
    ({"instruction": "I", "input": "X", "output": "O"}, "alpaca", "I\n\nX", "O"),
    ({"instruction": "I", "input": "", "output": "O"}, "alpaca", "I", "O"),
    ({"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}, "messages", "U", "A"),
])
def test_formats_are_detected_and_normalised(tmp_path, row, fmt, user, assistant):
    records, found = data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert found == fmt and len(records) == 2
    assert records[0]["messages"][-2:] == [{"role": "user", "content": user},
                                           {"role": "assistant", "content": assistant}]


def test_text_format_and_bom_and_blank_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "hello"}\n\n   \n{"text": "world"}\n')
    records, fmt = data.read_jsonl(path)
    assert fmt == "text" and [r["text"] for r in records] == ["hello", "world"]


BAD_LINES = [
    ('{"prompt": "a", "response": ', "line 2", "invalid JSON"),
    ('["a", "b"]', "line 2", "expected a JSON object, got list"),
    ('{"prompt": "a", "respons": "b"}', "line 2", "did you mean 'response'"),
    ('{"prompt": 3, "response": "b"}', "line 2", "'prompt' must be a string, got int"),
    ('{"prompt": "  ", "response": "b"}', "line 2", "'prompt' is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2", "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 2", "no assistant turn"),
    ('{"text": "plain"}', "line 2", "text format but line 1 is prompt_response"),
]


@pytest.mark.parametrize("bad,where,problem", BAD_LINES)
def test_bad_line_names_file_line_and_problem(tmp_path, bad, where, problem):
    first = ({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}
             if "messages" in bad else {"prompt": "ok", "response": "ok"})
    path = write_jsonl(tmp_path / "bad.jsonl", [first, bad])
    with pytest.raises(DataError) as err:
        data.read_jsonl(path)
    msg = str(err.value)
    assert str(path) in msg and f":{where.split()[1]}:" in msg and problem in msg, msg


def test_bad_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    for name, problem in [("empty.jsonl", "no records"), ("blank.jsonl", "no records"),
                          ("latin1.jsonl", "not valid UTF-8"), ("missing.jsonl", "file not found"), ("", "directory")]:
        with pytest.raises(DataError, match=problem):
            data.read_jsonl(tmp_path / name)


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_answer_only_labels_end_with_trained_eos(arch):
    tok = prepare_tokenizer(build_tokenizer(arch))
    template = Template(tok)
    record = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris."}]}
    ids, labels = template.encode(record)
    trained = [i for i, label in zip(ids, labels) if label != data.IGNORE]
    assert tok.decode(trained, skip_special_tokens=True).strip() == "Paris."
    assert labels[-1] == ids[-1] == tok.convert_tokens_to_ids(template.end_of_turn)
    # the prompt the chat tools send is exactly the masked prefix the model was trained on
    prompt = template.encode_prompt(record["messages"][:1])
    assert ids[:len(prompt)] == prompt and all(label == data.IGNORE for label in labels[:len(prompt)])


def test_phi2_template_text():
    tok = prepare_tokenizer(build_tokenizer("phi"))
    template = Template(tok)
    assert template.kind == "phi2"
    assert template.render_prompt([{"role": "user", "content": "Hi"}]) == "Instruct: Hi\nOutput:"
    ids, _ = template.encode({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    assert tok.decode(ids) == "Instruct: Hi\nOutput: Yo<|endoftext|>"


def test_pad_equal_to_eos_never_masks_eos():
    tok = prepare_tokenizer(build_tokenizer("phi"))  # phi has no pad token: pad becomes EOS
    assert tok.pad_token_id == tok.eos_token_id
    template = Template(tok)
    examples, _ = data.encode_records(
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         {"messages": [{"role": "user", "content": "longer prompt here"}, {"role": "assistant", "content": "c"}]}],
        template, max_length=64)
    batch = data.collate(examples, tok.pad_token_id)
    for row in range(2):
        n = int(batch["attention_mask"][row].sum())
        assert batch["labels"][row, n - 1] == tok.eos_token_id  # last real token: EOS, trained
        assert (batch["labels"][row, n:] == data.IGNORE).all()  # padding: not trained


def test_train_on_prompt_trains_everything():
    tok = prepare_tokenizer(build_tokenizer("llama"))
    examples, _ = data.encode_records([{"messages": [{"role": "user", "content": "a b"},
                                                     {"role": "assistant", "content": "c"}]}],
                                      Template(tok), 64, train_on_prompt=True)
    assert examples[0]["labels"] == examples[0]["input_ids"]


def test_long_examples_truncate_and_drop_are_counted():
    tok = prepare_tokenizer(build_tokenizer("phi"))
    template = Template(tok)
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    examples, stats = data.encode_records([short, long_answer, long_prompt], template, max_length=20)
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 1)
    cut = examples[1]
    assert len(cut["input_ids"]) == 20 and cut["input_ids"][-1] != tok.eos_token_id  # no EOS on a cut answer
    _, stats = data.encode_records([short, long_answer, long_prompt], template, max_length=20, long_examples="drop")
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 2)
    report = data.encode_records([short, long_answer, long_prompt], template, 20)[1].report("t")
    assert "1 truncated, 1 dropped" in report


def test_length_grouped_batches_cover_everything_deterministically():
    lengths = [5, 50, 7, 48, 6, 51, 9, 47, 8, 49] * 3
    a = data.length_grouped_batches(lengths, 5, seed=1, epoch=0)
    assert a == data.length_grouped_batches(lengths, 5, seed=1, epoch=0)
    assert a != data.length_grouped_batches(lengths, 5, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in a)
    assert padded < 1.2 * sum(lengths)  # similar lengths share a batch: little padding


def test_validation_split_is_deterministic_and_disjoint():
    records = [{"text": str(i)} for i in range(20)]
    train, val = data.split_validation(records, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert data.split_validation(records, 0.1, seed=3) == (train, val)
    assert not {r["text"] for r in val} & {r["text"] for r in train}
    assert data.split_validation(records, 0.0, seed=3) == (records, [])


def test_ten_megabyte_line_is_read_then_cut_by_the_length_rule(tmp_path):
    huge = "word " * 2_000_000  # 10 MB answer on one line
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p", "response": huge}, {"prompt": "q", "response": "r"}])
    records, _ = data.read_jsonl(path)
    assert len(records[0]["messages"][1]["content"]) == len(huge)
    bad = tmp_path / "bigbad.jsonl"
    bad.write_text('{"prompt": "p", "response": "' + "x" * 10_000_000 + '"\n')  # unterminated object
    with pytest.raises(DataError) as err:
        data.read_jsonl(bad)
    assert len(str(err.value)) < 300  # the message names the problem without echoing the line


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_top_level_system_of_a_messages_record_becomes_its_system_turn(tmp_path):
    rows = [{"system": "Be brief.", "messages": _chat(("user", "Hi"), ("assistant", "Hello."))},
            {"system": "  ", "messages": _chat(("user", "Hi"), ("assistant", "Yo."))}]
    records, _ = data.read_jsonl(write_jsonl(tmp_path / "s.jsonl", rows))
    assert records[0]["messages"] == _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    assert records[1]["messages"] == _chat(("user", "Hi"), ("assistant", "Yo."))  # blank: as for prompt/response
    both = {"system": "Be brief.", "messages": _chat(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hi."))}
    with pytest.raises(DataError, match=r"s2.jsonl:2: .*'system'.*messages\[0\] is a system turn too"):
        data.read_jsonl(write_jsonl(tmp_path / "s2.jsonl", [rows[0], both]))


def test_duplicates_and_trimmed_user_turns_get_a_notice_not_an_error(tmp_path, capsys):
    ok = {"prompt": "a", "response": "b"}
    rows = [ok, {"prompt": "c", "response": "d"}, ok, ok]
    records, _ = data.read_jsonl(write_jsonl(tmp_path / "dup.jsonl", rows))
    assert len(records) == 4
    err = capsys.readouterr().err
    assert "dup.jsonl: notice: 2 records repeat an earlier one (lines 3, 4)" in err
    chats = [{"messages": _chat(("user", "q"), ("assistant", "a"), ("user", "unanswered"))},
             {"messages": _chat(("user", "q2"), ("assistant", "a2"))},
             {"messages": _chat(("user", "q3"), ("assistant", "a3"), ("user", "x"), ("user", "y"))}]
    records, _ = data.read_jsonl(write_jsonl(tmp_path / "trim.jsonl", chats))
    assert [r["messages"][-1]["role"] for r in records] == ["assistant"] * 3
    err = capsys.readouterr().err
    assert "trim.jsonl: notice: 2 conversations end with user turns that have no answer; they were left out " \
           "(lines 1, 3)" in err
    data.read_jsonl(write_jsonl(tmp_path / "clean.jsonl", rows[:2]))
    assert capsys.readouterr().err == ""
