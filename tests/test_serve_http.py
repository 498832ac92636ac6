"""The server on a real port: other web pages cannot drive it (Host names, Origin, content types), and a long
prompt being tokenised stalls neither /health nor other clients."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from phitune.generation import load as gen
from phitune.serving.routes import build_app

RED = [{"role": "user", "content": "Say the code for red"}]


@pytest.fixture(scope="module")
def loaded(memorised_adapter):
    return gen.load([f"tuned={memorised_adapter}"], precision="fp32")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on 127.0.0.1 from a thread of this process."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def parsed(raw):
    try:
        return json.loads(raw or b"null")
    except json.JSONDecodeError:
        return raw  # the page's HTML


def call(url, body=None, headers=None, timeout=120):
    """(status, parsed JSON or the raw body) of a GET (body None) or POST."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers={**h, **(headers or {})},
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, parsed(r.read())
    except urllib.error.HTTPError as e:
        return e.code, parsed(e.read())


def health_while(server, busy):
    """Run busy() in a thread; meanwhile time /health again and again. -> (busy's result, its seconds, the
    slowest /health answer while it ran)."""
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        job = pool.submit(busy)
        time.sleep(0.3)  # the body is sent and being worked on
        slowest = 0.0
        while not job.done():
            t = time.perf_counter()
            assert call(f"{server.url}/health", timeout=60)[0] == 200
            slowest = max(slowest, time.perf_counter() - t)
            time.sleep(0.05)
        return job.result(), time.perf_counter() - started, slowest


# ------------------------------------------------------------------ tokenising off the event loop

def test_a_long_render_does_not_block_health(loaded):
    """A 5 MB render once blocked /health for 6.4 s: the prompt was tokenised on the event loop."""
    body = {"model": "tuned", "messages": [{"role": "user", "content": "one two three " * 150_000}]}
    with Server(build_app(loaded, max_body_bytes=10_000_000)) as server:
        (status, answer), seconds, slowest = health_while(server, lambda: call(f"{server.url}/phitune/render", body))
    assert status == 200 and answer["tokens"] > 400_000
    assert seconds > 1.0 and slowest < seconds / 3, (seconds, slowest)  # before: /health waited for all of it


def test_a_long_prompt_stalls_no_other_stream(loaded):
    """A prompt far over the context is tokenised before the context check refuses it; meanwhile another
    client's answer and /health go on."""
    long = {"model": "base", "messages": [{"role": "user", "content": "one two three " * 150_000}]}
    with Server(build_app(loaded, max_body_bytes=10_000_000)) as server:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(call, f"{server.url}/v1/chat/completions",
                                {"model": "tuned", "messages": RED, "temperature": 0})
            (status, answer), seconds, slowest = health_while(
                server, lambda: call(f"{server.url}/v1/chat/completions", long))
            assert other.result()[1]["choices"][0]["message"]["content"] == "The code for red is one."
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert seconds > 1.0 and slowest < seconds / 3, (seconds, slowest)  # before: /health waited for all of it


# ------------------------------------------------------------------ other web pages

def test_foreign_host_names_cross_origin_posts_and_plain_text_are_refused(loaded):
    """DNS rebinding: attacker.example resolved to 127.0.0.1 reads nothing; other origins post nothing."""
    chat = {"model": "tuned", "messages": RED, "temperature": 0, "max_tokens": 4}
    with Server(build_app(loaded, host="127.0.0.1", allowed_hosts=["studio.lan"])) as server:
        url, port = server.url, server.port
        for path in ("/", "/health", "/v1/models", "/phitune/info", "/phitune/runs"):
            status, body = call(url + path, headers={"Host": f"attacker.example:{port}"})
            assert status == 403 and "--allowed_hosts attacker.example" in body["error"]["message"], path
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"10.1.2.3:{port}",
                         f"studio.lan:{port}", "STUDIO.LAN"):
                assert call(url + path, headers={"Host": host})[0] == 200, (path, host)
        # the request of the review: text/plain, foreign Host and Origin
        status, _ = call(f"{url}/v1/chat/completions", json.dumps(chat).encode(),
                         {"Host": f"attacker.example:{port}", "Origin": "http://attacker.example",
                          "Content-Type": "text/plain"})
        assert status == 403
        for path in ("/v1/chat/completions", "/v1/completions", "/phitune/render"):
            status, body = call(url + path, chat, {"Origin": "http://attacker.example"})
            assert status == 403 and body["error"]["code"] == "cross_origin", path
            status, body = call(url + path, chat, {"Origin": "null"})
            assert status == 403, path
            status, body = call(url + path, json.dumps(chat).encode(), {"Content-Type": "text/plain"})
            assert status == 415 and "application/json" in body["error"]["message"], path
        # the page's own origin, and a site named in --allowed_hosts, may post
        for origin in (url, "http://studio.lan:3000"):
            status, body = call(f"{url}/v1/chat/completions", chat, {"Origin": origin,
                                                                    "Content-Type": "application/json; charset=utf-8"})
            assert status == 200 and body["choices"][0]["message"]["content"], origin
        assert call(f"{url}/v1/chat/completions", chat, {"Origin": f"http://localhost:{port + 1}"})[0] == 403
    with Server(build_app(loaded, host="127.0.0.1", allowed_hosts=["*"])) as server:
        assert call(f"{server.url}/v1/models", headers={"Host": "anything.example"})[0] == 200
