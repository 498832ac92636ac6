"""`phitune serve` in-process: stop strings, token usage, admission, errors mid-stream, key on every route."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from phitune.generation import load as gen
from phitune.serving.routes import build_app

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
RED = [{"role": "user", "content": "Say the code for red"}]


@pytest.fixture(scope="module")
def loaded(memorised_adapter):
    return gen.load([f"tuned={memorised_adapter}"], precision="fp32")


def client(loaded, **limits):
    return TestClient(build_app(loaded, api_key=KEY, **limits))


def sse(response):
    """Parsed `data:` events of a streamed response, [DONE] excluded."""
    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stop_string_split_across_pieces_is_cut(loaded):
    with client(loaded) as c:
        whole = c.post("/v1/chat/completions", headers=AUTH,
                       json={"model": "tuned", "messages": RED, "temperature": 0, "stop": "for red"}).json()
        assert whole["choices"][0]["message"]["content"] == "The code "  # as streamed: nothing stripped
        assert whole["choices"][0]["finish_reason"] == "stop"
        with c.stream("POST", "/v1/chat/completions", headers=AUTH,
                      json={"model": "tuned", "messages": RED, "temperature": 0, "stop": ["for red"],
                            "stream": True}) as r:
            events = sse(r)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert text == "The code "
        assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_generated_tokens(loaded):
    with client(loaded) as c:
        for stream in (False, True):
            body = {"model": "base", "messages": RED, "temperature": 0, "max_tokens": 8, "stream": stream}
            if stream:
                with c.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as r:
                    last = sse(r)[-1]
            else:
                last = c.post("/v1/chat/completions", headers=AUTH, json=body).json()
            # the tiny random base never says its end-of-turn token within 8 tokens
            assert last["usage"]["completion_tokens"] == 8
            assert last["choices"][0]["finish_reason"] == "length"
        tuned = c.post("/v1/chat/completions", headers=AUTH,
                       json={"model": "tuned", "messages": RED, "temperature": 0, "max_tokens": 64}).json()
        want = len(loaded.tokenizer("The code for red is one.", add_special_tokens=False)["input_ids"]) + 1
        assert tuned["usage"]["completion_tokens"] == want  # the answer and its end-of-turn token


def test_full_queue_is_a_429_before_the_stream_starts(loaded):
    with client(loaded, max_queue=0) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", headers=AUTH,
                       json={"model": "tuned", "messages": RED, "stream": stream})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"


def test_a_failure_mid_stream_ends_with_an_error_event(loaded, monkeypatch):
    app = build_app(loaded, api_key=KEY)
    engine = app.state.scheduler.engine
    real, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device fell over")
        return real()
    monkeypatch.setattr(engine, "step", failing_step)
    with TestClient(app) as c:
        with c.stream("POST", "/v1/chat/completions", headers=AUTH,
                      json={"model": "base", "messages": RED, "temperature": 0, "max_tokens": 30,
                            "stream": True}) as r:
            assert r.status_code == 200
            events = sse(r)
        assert "the device fell over" in events[-1]["error"]["message"]
        monkeypatch.setattr(engine, "step", real)  # the server goes on serving
        ok = c.post("/v1/chat/completions", headers=AUTH, json={"model": "tuned", "messages": RED, "temperature": 0})
        assert ok.json()["choices"][0]["message"]["content"] == "The code for red is one."


def test_key_covers_every_route_but_health(loaded):
    with client(loaded) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "phitune"
        assert c.get("/v1/models").status_code == 401


def test_body_limit_holds_without_a_content_length(loaded):
    with client(loaded, max_body_bytes=1000) as c:
        chunks = (b"x" * 500 for _ in range(10))  # chunked transfer: the server learns the size as it reads
        r = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=chunks)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_prompt_plus_max_tokens_never_exceeds_the_context(loaded):
    context = loaded.model.config.max_position_embeddings
    with client(loaded, max_prompt_tokens=10 * context) as c:
        long = [{"role": "user", "content": "one two three " * (context // 3)}]
        r = c.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": long, "max_tokens": 64})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_concurrent_mixed_requests_equal_serial_answers(precision, loaded, memorised_adapter):
    """8-32 clients, base and adapter mixed, bad requests among them: every good answer equals its serial answer
    (bit for bit wherever this CPU's matmuls treat rows alike: rows.exact_rows)."""
    from test_rows import exact_here
    if precision != "fp32":
        loaded = gen.load([f"tuned={memorised_adapter}"], precision=precision)
    if not exact_here(loaded):
        pytest.skip(f"this CPU's {precision} matmul gives a row different bits in different batches")
    prompts = ["Say the code for red", "Say the code for blue", "one two three", "Say the code for gold"]
    bodies = [{"model": m, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": p}]}
              for p in prompts for m in ("base", "tuned")]
    with client(loaded) as c:
        serial = [c.post("/v1/chat/completions", headers=AUTH, json=b).json()["choices"][0]["message"]["content"]
                  for b in bodies]

        def one(i):
            if i % 5 == 4:
                return None, c.post("/v1/chat/completions", headers=AUTH, json={"model": "tuned", "messages": []})
            return i % len(bodies), c.post("/v1/chat/completions", headers=AUTH, json=bodies[i % len(bodies)])
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(one, range(32)))
    for k, r in results:
        if k is None:
            assert r.status_code == 400
        else:
            assert r.json()["choices"][0]["message"]["content"] == serial[k]


def test_disconnected_stream_frees_its_row(loaded):
    app = build_app(loaded, api_key=KEY)
    scheduler = app.state.scheduler
    with TestClient(app) as c:
        with c.stream("POST", "/v1/chat/completions", headers=AUTH,
                      json={"model": "base", "messages": RED, "max_tokens": 1000, "stream": True,
                            "temperature": 0}) as r:
            next(r.iter_lines())
        deadline = time.time() + 10
        while scheduler.active and time.time() < deadline:
            time.sleep(0.05)
        assert scheduler.active == 0
        started = time.perf_counter()
        ok = c.post("/v1/chat/completions", headers=AUTH, json={"model": "tuned", "messages": RED, "temperature": 0})
        assert ok.json()["choices"][0]["message"]["content"] == "The code for red is one."
        assert time.perf_counter() - started < 10


def test_a_whole_answer_stops_when_the_client_hangs_up(loaded):
    """Not streamed: the server watches the connection and cancels the row when the client is gone."""
    import asyncio
    app = build_app(loaded, api_key=KEY, max_tokens_limit=1900)
    submitted, real_submit = [], app.state.scheduler.submit
    app.state.scheduler.submit = lambda r: (submitted.append(r), real_submit(r))[1]
    body = json.dumps({"model": "base", "temperature": 0, "max_tokens": 1900, "messages": RED}).encode()
    began = time.perf_counter()

    async def receive():  # the ASGI server's side: the body, then (after 0.2 s) the client hangs up
        if not hasattr(receive, "sent"):
            receive.sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if time.perf_counter() - began > 0.2:
            return {"type": "http.disconnect"}
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                                              (b"content-type", b"application/json")],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert submitted[0].finish_reason == "cancelled" and len(submitted[0].tokens) < 1900


# ------------------------------------------------------------------ bodies, render, created, same text, keys

def test_render_body_is_bounded_like_every_post(loaded):
    """/phitune/render once read any body whole (20 MB answered after 47 s): the same 413 as the API routes."""
    big = {"model": "base", "messages": [{"role": "user", "content": "x" * 5000}]}
    with client(loaded, max_body_bytes=1000) as c:
        for path in ("/phitune/render", "/v1/chat/completions", "/v1/completions"):
            r = c.post(path, headers=AUTH, json=big)
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", path
            chunks = (b"x" * 500 for _ in range(10))  # no Content-Length
            r = c.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=chunks)
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", path
        ok = c.post("/phitune/render", headers=AUTH, json={"model": "tuned", "messages": RED})
        assert ok.status_code == 200 and ok.json()["prompt"].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("body,param", [({"model": ["a"], "messages": RED}, "model"),
                                        ({"model": {"a": 1}, "messages": RED}, "model"),
                                        ({"model": "base", "messages": []}, "messages"),
                                        ({"model": "base", "messages": [{"role": "user"}]}, "messages.0.content"),
                                        ([1, 2], None)])
def test_render_answers_openai_shaped_400s(loaded, body, param):
    with client(loaded) as c:
        r = c.post("/phitune/render", headers=AUTH, json=body)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_created_is_the_time_of_the_request(loaded):
    with client(loaded) as c:
        time.sleep(1.5)
        before = int(time.time())
        whole = c.post("/v1/chat/completions", headers=AUTH, json={"model": "tuned", "messages": RED,
                                                                   "max_tokens": 2}).json()
        with c.stream("POST", "/v1/completions", headers=AUTH,
                      json={"model": "base", "prompt": "one", "max_tokens": 2, "stream": True}) as r:
            chunk = sse(r)[0]
    assert whole["created"] >= before and chunk["created"] >= before


def test_whole_and_streamed_answers_are_the_same_text(loaded):
    """The whole answer was stripped, the streamed one not: a stop string that leaves a trailing space showed it."""
    with client(loaded) as c:
        for body in ({"model": "tuned", "messages": RED, "temperature": 0, "stop": "is"},
                     {"model": "base", "messages": RED, "temperature": 0, "max_tokens": 12}):
            whole = c.post("/v1/chat/completions", headers=AUTH, json=body).json()["choices"][0]["message"]["content"]
            with c.stream("POST", "/v1/chat/completions", headers=AUTH, json={**body, "stream": True}) as r:
                streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in sse(r) if e["choices"])
            assert whole == streamed


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [3.0, "5", True])
def test_token_limits_are_whole_numbers(loaded, field, value):
    with client(loaded) as c:
        r = c.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": RED, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_key_is_a_bearer_token_in_any_case(loaded):
    with client(loaded) as c:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert c.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
        for wrong in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer", f"Bearer  {KEY[:-1]}"):
            assert c.get("/v1/models", headers={"Authorization": wrong}).status_code == 401


def test_a_queue_of_zero_is_refused_at_start(capsys):
    from conftest import run_cli
    assert run_cli("serve", "--max_queue", "0") == 2
    assert "max_queue" in capsys.readouterr().err


def test_an_adapter_named_base_is_refused(memorised_adapter, tmp_path, capsys):
    """'base' is the base model's name on the page, in compare and on the API: an adapter cannot take it."""
    import shutil

    from conftest import run_cli
    from phitune.errors import PhituneError
    run = tmp_path / "runs" / "base"
    shutil.copytree(memorised_adapter, run / "final_adapter")
    with pytest.raises(PhituneError, match=r"adapter .*base.* name=DIR"):
        gen.load([str(run / "final_adapter")], precision="fp32")
    questions = tmp_path / "q.yaml"
    questions.write_text("questions: [Say the code for red]\n")
    assert run_cli("compare", "--adapter_path", f"base={memorised_adapter}", "--questions", questions) == 2
    err = capsys.readouterr().err
    assert "'base'" in err and "base-tuned=" in err
