"""OpenAI request fields `phitune serve` honours (max_completion_tokens, logprobs, top_logprobs,
stream_options.include_usage) and the ones it refuses by name instead of ignoring them."""
import json

import pytest
import torch
from fastapi.testclient import TestClient

from phitune.generation import load as gen
from phitune.serving.routes import build_app

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
RED = [{"role": "user", "content": "Say the code for red"}]


@pytest.fixture(scope="module")
def loaded(memorised_adapter):
    return gen.load([f"tuned={memorised_adapter}"], precision="fp32")


@pytest.fixture(scope="module")
def c(loaded):
    with TestClient(build_app(loaded, api_key=KEY, max_tokens_limit=64)) as c:
        yield c


def chat(c, **body):
    return c.post("/v1/chat/completions", headers=AUTH, json={"model": "tuned", "messages": RED, **body})


def events(c, path, body):
    with c.stream("POST", path, headers=AUTH, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(e) for e in lines[:-1]]


def reference_logprobs(loaded, adapter, prompt_ids, tokens):
    """log-softmax of a plain forward pass over prompt + answer: the distribution each answer token came from."""
    with loaded.use(adapter), torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1)


# ------------------------------------------------------------------ max_completion_tokens

def test_max_completion_tokens_is_honoured_and_wins_over_max_tokens(c):
    for body in ({"max_completion_tokens": 3}, {"max_completion_tokens": 3, "max_tokens": 10}):
        r = c.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": RED, **body}).json()
        assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    r = c.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "one", "max_completion_tokens": 2})
    assert r.json()["usage"]["completion_tokens"] == 2
    for bad in (0, 65):
        r = chat(c, max_completion_tokens=bad, max_tokens=5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


# ------------------------------------------------------------------ fields refused by name

@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", -1),
                                         ("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}),
                                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("tool_choice", "required"), ("n", 2), ("best_of", 3), ("echo", True),
                                         ("functions", [{"name": "f"}]), ("reasoning_effort", "high"),
                                         ("some_new_field", 1)])
def test_fields_this_server_does_not_implement_are_a_400_naming_them(c, field, value):
    for path, body in (("/v1/chat/completions", {"messages": RED}), ("/v1/completions", {"prompt": "one"})):
        r = c.post(path, headers=AUTH, json={"model": "base", "max_tokens": 2, **body, field: value})
        assert r.status_code == 400, (path, field)
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize("field,value", [("presence_penalty", 0), ("frequency_penalty", 0.0), ("logit_bias", {}),
                                         ("response_format", {"type": "text"}), ("tools", []), ("n", 1),
                                         ("logit_bias", None), ("user", "someone"), ("tool_choice", "none")])
def test_their_neutral_values_are_accepted(c, field, value):
    r = c.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": RED, "max_tokens": 2,
                                                           field: value})
    assert r.status_code == 200, r.json()


# ------------------------------------------------------------------ logprobs

def test_chat_logprobs_are_the_models_log_probabilities(c, loaded):
    body = chat(c, temperature=0, logprobs=True, top_logprobs=3).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"] == "The code for red is one."
    # every token but the end-of-turn token that ended the answer
    assert len(content) == body["usage"]["completion_tokens"] - 1
    tok = loaded.tokenizer
    template = loaded.template_for("tuned")
    prompt = template.encode_prompt(RED)
    answer = tok("The code for red is one.", add_special_tokens=False)["input_ids"]
    ref = reference_logprobs(loaded, "tuned", prompt, answer)
    for i, e in enumerate(content):
        assert e["logprob"] == pytest.approx(float(ref[i, answer[i]]), abs=1e-4)
        assert bytes(e["bytes"]).decode() == e["token"]
        top = e["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == e["token"]  # greedy: the chosen token is the best one
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        best = torch.topk(ref[i], 3)
        assert [t["logprob"] for t in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    plain = chat(c, temperature=0).json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"]["content"] == choice["message"]["content"]
    only = chat(c, temperature=0, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in only] == [[]] * len(only)
    assert [e["logprob"] for e in only] == [e["logprob"] for e in content]


def test_streamed_chat_logprobs_and_usage_chunk(c):
    whole = chat(c, temperature=0, logprobs=True, top_logprobs=2).json()
    chunks = events(c, "/v1/chat/completions", {"model": "tuned", "messages": RED, "temperature": 0,
                                                "logprobs": True, "top_logprobs": 2,
                                                "stream_options": {"include_usage": True}})
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == whole["usage"]  # OpenAI's usage chunk
    assert all(ch["usage"] is None for ch in chunks[:-1])
    streamed = [e for ch in chunks[:-1] if ch["choices"][0].get("logprobs")
                for e in ch["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1])
    assert text == "".join(e["token"] for e in streamed)
    # without stream_options the stream is as before: usage on the last choice chunk, no usage chunk
    plain = events(c, "/v1/chat/completions", {"model": "tuned", "messages": RED, "temperature": 0})
    assert plain[-1]["choices"][0]["finish_reason"] == "stop" and plain[-1]["usage"] == whole["usage"]


def test_completion_logprobs_in_the_legacy_shape(c, loaded):
    body = {"model": "base", "prompt": "one two", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = c.post("/v1/completions", headers=AUTH, json=body).json()
    choice = whole["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 6
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    prompt = loaded.tokenizer("one two")["input_ids"]
    generated = loaded.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
    if len(generated) == 6:  # the text re-encodes to the same tokens (not guaranteed for a random model)
        ref = reference_logprobs(loaded, None, prompt, generated)
        assert lp["token_logprobs"] == pytest.approx([float(ref[i, t]) for i, t in enumerate(generated)], abs=1e-4)
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value and 1 <= len(top) <= 3  # the chosen token is always in
    chunks = events(c, "/v1/completions", body)
    streamed = {k: [v for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                    for v in ch["choices"][0]["logprobs"][k]] for k in lp}
    assert streamed == lp


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": RED, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": RED, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": RED, "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": "one", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "one", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": RED, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage")])
def test_bad_logprob_settings_are_a_400(c, path, body, param):
    r = c.post(path, headers=AUTH, json={"model": "base", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
