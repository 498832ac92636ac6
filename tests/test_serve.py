"""`phitune serve` answers the real openai client on a localhost port."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

KEY = "test-key-123"


def post(url, body, key=KEY):
    """Raw POST (bytes or a JSON-able object) -> (status, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(memorised_adapter, tiny_models):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "phitune", "serve", "--adapter_path",
                             f"tuned={memorised_adapter}", "--port", str(port), "--api-key", KEY,
                             "--max_tokens_limit", "64", "--max_body_bytes", "20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}),
                                   timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read()) from None
            time.sleep(0.5)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_models_chat_stream_and_completions(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["base", "tuned"]
    reply = c.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Say the code for red"}],
                                      temperature=0)
    assert reply.choices[0].message.content == "The code for red is one."
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
    base = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "Say the code for red"}],
                                     temperature=0, max_tokens=8)
    assert base.choices[0].message.content != "The code for red is one."
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="tuned", stream=True, temperature=0,
                                        messages=[{"role": "user", "content": "Say the code for blue"}])]
    assert "".join(pieces).strip() == "The code for blue is two." and len([p for p in pieces if p]) > 1
    done = c.completions.create(model="tuned", prompt="The quick brown", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.prompt_tokens > 0


def test_errors_have_openai_shape(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "does not exist" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|the prompt is"):
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "word " * 3000}])
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    status, body = post(f"{url}/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post(f"{url}/chat/completions", {"model": "base", "messages": [{"role": "user", "content": 3}]})
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, body = post(f"{url}/chat/completions", {"model": "base", "max_tokens": -1,
                                                    "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = post(f"{url}/chat/completions", b"x" * 30000)
    assert status == 413 and "body" in body["error"]["message"]
    status, body = post(f"{url}/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}]},
                        key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def stream_chat(url, model, content):
    """Raw streaming request -> (status, concatenated text)."""
    body = json.dumps({"model": model, "stream": True, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    text = ""
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                text += delta.get("content") or ""
        return r.status, text.strip()


def test_load_200_requests_from_20_clients(server):
    """Good requests all answered correctly, bad ones all 4xx JSON, server up, memory steady (127.0.0.1 only)."""
    import psutil

    from conftest import MEMORISE
    url, proc = server
    rss = lambda: psutil.Process(proc.pid).memory_info().rss
    bad = [b"{broken", {"model": "tuned", "messages": "not a list"}, {"model": "tuned", "max_tokens": -5,
           "messages": [{"role": "user", "content": "x"}]}, {"model": "ghost", "messages": [{"role": "user",
           "content": "x"}]}, {"model": "tuned", "messages": [{"role": "user", "content": "word " * 3000}]}]

    def one(i):
        row = MEMORISE[i % len(MEMORISE)]
        kind = i % 5
        if kind == 0:
            return "bad", post(f"{url}/chat/completions", bad[(i // 5) % len(bad)])
        if kind == 1:
            return row["response"], stream_chat(url, "tuned", row["prompt"])
        status, body = post(f"{url}/chat/completions", {"model": "tuned", "temperature": 0, "max_tokens": 32,
                                                        "messages": [{"role": "user", "content": row["prompt"]}]})
        return row["response"], (status, body["choices"][0]["message"]["content"] if status == 200 else body)

    with ThreadPoolExecutor(max_workers=20) as pool:  # a first round grows batches and caches to full size
        list(pool.map(one, range(200)))
    before = rss()
    started = time.time()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(200)))
    assert time.time() - started < 600
    for want, (status, got) in results:
        if want == "bad":
            assert 400 <= status < 500 and "error" in got and "message" in got["error"]
        else:
            assert status == 200 and got == want
    assert proc.poll() is None
    after = rss()
    assert after <= 1.10 * before, (before, after)



def test_openai_client_gets_logprobs_usage_chunk_and_max_completion_tokens(server):
    url, _ = server
    c = client(url)
    red = [{"role": "user", "content": "Say the code for red"}]
    whole = c.chat.completions.create(model="tuned", messages=red, temperature=0, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content == "The code for red is one."
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)
    chunks = list(c.chat.completions.create(model="tuned", messages=red, temperature=0, logprobs=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = [t.token for ch in chunks[:-1] if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]
    done = c.completions.create(model="tuned", prompt="The quick brown", max_tokens=5, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    # the tiny model may end this free text early (its greedy path differs between CPUs): one logprob per text
    # token, and five of them unless it stopped (usage counts the end-of-text token as well)
    n = len(lp.tokens)
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert n == 5 if done.choices[0].finish_reason == "length" else done.usage.completion_tokens == n + 1
    short = c.chat.completions.create(model="base", messages=red, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        c.chat.completions.create(model="base", messages=red, presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model="base", messages=red, response_format={"type": "json_object"})


def test_serve_refuses_other_sites(server):
    """The review's request: a foreign Host (DNS rebinding) and a foreign Origin with a text/plain body."""
    url, _ = server
    root = url[:-len("/v1")]
    port = root.rsplit(":", 1)[1]
    body = json.dumps({"model": "tuned", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for path, data, headers, want in [
            ("/phitune/info", None, {"Host": f"attacker.example:{port}"}, 403),
            ("/v1/models", None, {"Host": f"attacker.example:{port}"}, 403),
            ("/v1/chat/completions", body, {"Host": f"attacker.example:{port}", "Origin": "http://attacker.example",
                                            "Content-Type": "text/plain"}, 403),
            ("/v1/chat/completions", body, {"Origin": "http://attacker.example",
                                            "Content-Type": "application/json"}, 403),
            ("/v1/chat/completions", body, {"Content-Type": "text/plain"}, 415),
            ("/v1/models", None, {"Host": f"localhost:{port}"}, 200)]:
        req = urllib.request.Request(root + path, data=data, headers={"Authorization": f"Bearer {KEY}", **headers})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status == want, (path, headers)
