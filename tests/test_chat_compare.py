"""`phitune compare` and `phitune chat`: real base answers, batch and interactive use, clear errors."""
import json
import os
import subprocess
import sys

import pexpect
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MEMORISE, ROOT, run_cli
from phitune.compare import read_questions, run_batch
from phitune.errors import PhituneError
from phitune.generation import load as gen
from phitune.models.loading import prepare_tokenizer

PHITUNE = [sys.executable, "-m", "phitune"]


def plain_greedy(model, tokenizer, prompt_ids, stop_ids, n=30):
    """Reference decode: plain transformers generate, one prompt, no padding."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_base_answers_are_really_base(tiny_models, memorised_adapter):
    """Greedy base output in compare == a freshly loaded base with no adapter; tuned == the adapter model."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    loaded = gen.load([memorised_adapter], precision="fp32")
    questions = [{"prompt": r["prompt"]} for r in MEMORISE] + [{"prompt": "one two three"}]
    rows = run_batch(loaded, questions, [None, loaded.first_adapter], gen.Sampling(max_new_tokens=30), batch_size=3)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_models["llama"]))
    fresh = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    stop = loaded.template.stop_token_ids()
    for q, row in zip(questions, rows):
        prompt = loaded.template.encode_prompt([{"role": "user", "content": q["prompt"]}])
        want = tok.decode(plain_greedy(fresh, tok, prompt, stop), skip_special_tokens=True).strip()
        assert row["answers"]["base"].text == want
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
                                      memorised_adapter).eval()
    for q, row in zip(questions, rows):
        prompt = loaded.template.encode_prompt([{"role": "user", "content": q["prompt"]}])
        want = tok.decode(plain_greedy(tuned, tok, prompt, stop), skip_special_tokens=True).strip()
        assert row["answers"]["run"].text == want
    for r, row in zip(MEMORISE, rows):
        assert row["answers"]["run"].text == r["response"]
        assert row["answers"]["base"].text != r["response"]


def test_compare_batch_cli_report_and_two_adapters(memorised_adapter, tmp_path):
    qfile = tmp_path / "q.yaml"
    qfile.write_text("questions:\n  - Say the code for red\n  - prompt: Say the code for blue\n"
                     "    expected: The code for blue is two.\n    max_new_tokens: 12\n")
    for suffix in ("md", "jsonl", "html"):
        report = tmp_path / f"cmp.{suffix}"
        result = subprocess.run(PHITUNE + ["compare", "--adapter_path", str(memorised_adapter), "--adapter_path",
                                           str(memorised_adapter), "--questions", str(qfile), "--report", str(report)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "press Enter" not in result.stdout
        text = report.read_text()
        assert "The code for red is one." in text and "The code for blue is two." in text
    assert "[base]" in result.stdout and "[run]" in result.stdout and "[run-2]" in result.stdout
    assert "memory: peak" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "cmp.jsonl").read_text().splitlines()]
    assert set(rows[1]["answers"]) == {"base", "run", "run-2"} and rows[2]["expected"] == "The code for blue is two."


@pytest.mark.parametrize("content,problem", [
    (None, "questions file not found"),
    ("questions: [unclosed", "not valid YAML"),
    ("questions: just one string", "'questions' must be a non-empty list"),
    ("other: []", "expected a top-level 'questions:' list"),
    ("questions:\n  - {promt: x}", "question 1 must be a non-empty string or a mapping with 'prompt'"),
])
def test_bad_questions_files(tmp_path, content, problem):
    path = tmp_path / "q.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PhituneError, match=problem):
        read_questions(path)


def test_bad_adapters_exit_2_without_traceback(tiny_models, memorised_adapter, tmp_path, capsys):
    assert run_cli("compare", "--adapter_path", tmp_path / "nope", "--questions", ROOT / "examples/questions.yaml") == 2
    assert "adapter directory not found" in capsys.readouterr().err
    # an adapter trained on llama, put on a phi base
    assert run_cli("compare", "--adapter_path", memorised_adapter, "--model", tiny_models["phi"], "--questions",
                   ROOT / "examples/seed_questions.yaml") == 2
    err = capsys.readouterr().err
    assert "adapter was trained on a base with model_type=llama, but this base has model_type=phi" in err
    assert "Traceback" not in err


def test_chat_prompt_and_piped_stdin_print_answers_only(memorised_adapter):
    args = PHITUNE + ["chat", "--adapter_path", str(memorised_adapter), "--temperature", "0"]
    one = subprocess.run(args + ["--prompt", "Say the code for green"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and one.stdout == "The code for green is three.\n"
    piped = subprocess.run(args, input="Say the code for red\nSay the code for gold\n", capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 0 and piped.stdout == "The code for red is one.\nThe code for gold is four.\n"


def spawn(args, tmp_path):
    env = dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm")
    child = pexpect.spawn(PHITUNE[0], PHITUNE[1:] + args, env=env, encoding="utf-8", timeout=120,
                          dimensions=(40, 120), cwd=str(tmp_path))
    return child


def test_interactive_chat_in_a_terminal(memorised_adapter, tiny_models, tmp_path):
    child = spawn(["chat", "--adapter_path", str(memorised_adapter), "--temperature", "0"], tmp_path)
    child.expect("you> ")
    child.sendline("Say the code for blue")
    child.expect("model> ")
    child.expect("The code for blue is two.")
    child.expect("you> ")
    child.sendline("/help")
    child.expect("/max_tokens N")
    child.sendline("/max_tokens 3")
    child.expect(r"\(max tokens 3\)")
    child.sendline("/temp 0")
    child.expect(r"\(temperature 0.0\)")
    child.sendline("/save convo.json")
    child.expect("saved 2 messages")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    saved = json.loads((tmp_path / "convo.json").read_text())
    assert saved["messages"][1] == {"role": "assistant", "content": "The code for blue is two."}


def test_ctrl_c_stops_the_answer_not_the_session(tiny_models, tmp_path):
    # The untrained tiny base rambles: a long answer to interrupt.
    child = spawn(["chat", "--model", str(tiny_models["phi"]), "--max_new_tokens", "1900", "--temperature", "1.0",
                   "--seed", "1"], tmp_path)
    child.expect("you> ")
    child.sendline("tell me a long story")
    child.expect("model> ")
    child.expect(r"\S{5}")  # some streamed text has arrived
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_interactive_compare_repl(memorised_adapter, tmp_path):
    child = spawn(["compare", "--adapter_path", str(memorised_adapter)], tmp_path)
    child.expect("question> ")
    child.sendline("Say the code for gold")
    child.expect("The code for gold is four.")
    child.expect("question> ")
    child.sendeof()
    child.expect(pexpect.EOF)


def test_every_command_takes_a_config_file(memorised_adapter, tmp_path):
    """compare's settings from YAML, a flag on the command line winning; an unknown key is named."""
    qfile = tmp_path / "q.yaml"
    qfile.write_text("questions:\n  - Say the code for red\n")
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"adapter_path: [{memorised_adapter}]\nquestions: {qfile}\nmax_new_tokens: 3\nno_color: true\n"
                   f"precision: fp32\n")
    result = subprocess.run(PHITUNE + ["compare", "--config", str(cfg), "--max_new_tokens", "30"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "The code for red is one." in result.stdout  # 30 tokens from the flag, not 3 from the file
    cfg.write_text("adapter_path: [x]\nquestionz: q.yaml\n")
    bad = subprocess.run(PHITUNE + ["compare", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "questionz: unknown key; did you mean questions?" in bad.stderr


def test_chat_tiny_temperature_is_greedy_and_nan_is_refused(memorised_adapter, capsys):
    """--temperature 1e-40 once ended in a traceback and nan was silently greedy."""
    args = ["chat", "--adapter_path", memorised_adapter, "--precision", "fp32", "--prompt", "Say the code for green"]
    assert run_cli(*args, "--temperature", "1e-40") == 0
    assert capsys.readouterr().out == "The code for green is three.\n"
    assert run_cli(*args, "--temperature", "nan") == 2
    err = capsys.readouterr().err
    assert "temperature: must be a finite number" in err and "Traceback" not in err


def test_chat_session_temp_and_a_conversation_too_long_for_the_context(memorised_adapter, monkeypatch, capsys):
    """/temp 1e-40 answers greedily, /temp nan is refused, and a conversation that with its answer passes the
    model's context is not run past it: the user is told how to go on."""
    from phitune.chat import Session
    loaded = gen.load([memorised_adapter], precision="fp32", merge=True)
    lines = iter(["/temp 1e-40", "Say the code for blue", "/temp nan", f"/max_tokens {loaded.context - 5}",
                  "Say the code for red", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session = Session(loaded, gen.Sampling(max_new_tokens=30, temperature=0.7, seed=1), None)
    session.run()
    out = capsys.readouterr().out
    assert "(temperature 1e-40 (greedy))" in out and "The code for blue is two." in out
    assert "error: usage: /temp X (must be a finite number, got nan)" in out
    assert f"passes the model's context of {loaded.context} tokens" in out and "/reset" in out
    assert len(session.history) == 2 and session.sampling.temperature == 1e-40


def test_compare_and_eval_say_when_a_question_passes_the_context(memorised_adapter, tmp_path, capsys):
    from phitune.evaluate import answer_jobs
    loaded = gen.load([f"tuned={memorised_adapter}"], precision="fp32")
    context = loaded.context
    long = "one two three " * 40
    questions = [{"prompt": "Say the code for red"}, {"prompt": long}]
    with pytest.raises(PhituneError, match=rf"question 2 \('one two three.*'\) for base: the prompt is \d+ tokens; "
                                           rf"with max_new_tokens {context - 40} that passes the model's context "
                                           rf"of {context} tokens"):
        run_batch(loaded, questions, [None, "tuned"], gen.Sampling(max_new_tokens=context - 40))
    evals = [{"messages": [{"role": "user", "content": q["prompt"]}], "references": ["x"]} for q in questions]
    jobs = answer_jobs(loaded, evals, [None, "tuned"], context - 40)
    err = capsys.readouterr().err
    assert "note: question 2 ('one two three" in err and "for tuned" in err and "its answer is cut at" in err
    assert [j[2].max_new_tokens == context - 40 for j in jobs] == [True, False, True, False]
    too_long = [{"messages": [{"role": "user", "content": "one two three " * context}], "references": ["x"]}]
    with pytest.raises(PhituneError, match="question 1 .* no room is left for an answer"):
        answer_jobs(loaded, too_long, [None], 10)
