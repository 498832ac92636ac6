"""Limits of the generation thread: one bad row ends alone, bounded stop lists, fair admission, shutdown."""
import threading
import time

import pytest
from fastapi.testclient import TestClient

from phitune.generation import load as gen
from phitune.generation.engine import Engine, TextStream
from phitune.generation.scheduler import Scheduler
from phitune.serving.routes import build_app

RED = [{"role": "user", "content": "Say the code for red"}]


@pytest.fixture(scope="module")
def base(tiny_models):
    return gen.load(model=str(tiny_models["llama"]), precision="fp32")


def wait(requests, seconds=60):
    deadline = time.time() + seconds
    while not all(r.done for r in requests) and time.time() < deadline:
        time.sleep(0.01)
    assert all(r.done for r in requests)


def ids_of(loaded, text="hi"):
    return loaded.template.encode_prompt([{"role": "user", "content": text}])


def test_a_tiny_temperature_is_greedy_and_fails_no_neighbour(base):
    """temperature 1e-40 once divided the logits into inf/nan and failed every row in flight."""
    scheduler = Scheduler(Engine(base), max_batch=4)
    try:
        greedy = base.request(ids_of(base), None, gen.Sampling(max_new_tokens=12), stop_ids=[])
        tiny = base.request(ids_of(base), None, gen.Sampling(max_new_tokens=12, temperature=1e-40, seed=1),
                            stop_ids=[])
        with scheduler._wake:  # both join the same batch
            scheduler.submit(greedy)
            scheduler.submit(tiny)
        wait([greedy, tiny])
    finally:
        scheduler.close()
    assert (greedy.finish_reason, tiny.finish_reason) == ("length", "length"), (greedy.error, tiny.error)
    assert tiny.tokens == greedy.tokens


def test_a_row_that_fails_ends_alone(base):
    """A row whose text cannot be delivered (its client's callback raises) ends with an error; its
    neighbour in the same batch answers in full."""
    scheduler = Scheduler(Engine(base), max_batch=4)

    def broken(piece):
        raise RuntimeError("the client's event loop is gone")
    try:
        good = base.request(ids_of(base), None, gen.Sampling(max_new_tokens=12), stop_ids=[])
        bad = base.request(ids_of(base), None, gen.Sampling(max_new_tokens=12), stop_ids=[], on_text=broken)
        with scheduler._wake:
            scheduler.submit(good)
            scheduler.submit(bad)
        wait([good, bad])
    finally:
        scheduler.close()
    assert good.finish_reason == "length" and len(good.tokens) == 12, good.error
    assert bad.finish_reason == "error" and "event loop is gone" in bad.error


def test_a_failed_prefill_ends_only_the_joining_row(base):
    """A request whose prefill fails (here a token id outside the vocabulary) ends alone: the rows already
    running and a good request joining with it go on."""
    scheduler = Scheduler(Engine(base), max_batch=4)
    try:
        running = base.request(ids_of(base), None, gen.Sampling(max_new_tokens=60), stop_ids=[])
        scheduler.submit(running)
        deadline = time.time() + 30
        while not running.tokens and time.time() < deadline:
            time.sleep(0.005)
        vocab = base.model.config.vocab_size
        bad = base.request([1, vocab + 5], None, gen.Sampling(max_new_tokens=5), stop_ids=[])
        good = base.request(ids_of(base, "one two"), None, gen.Sampling(max_new_tokens=5), stop_ids=[])
        with scheduler._wake:
            scheduler.submit(bad)
            scheduler.submit(good)
        wait([running, bad, good])
    finally:
        scheduler.close()
    assert bad.finish_reason == "error" and bad.error
    assert (running.finish_reason, len(running.tokens)) == ("length", 60), running.error
    assert good.finish_reason == "length", good.error


def test_sampling_settings_are_checked(base):
    """Non-finite or out-of-range values are refused by the engine's own check, naming the field."""
    for field, value in [("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1),
                         ("top_p", 0.0), ("top_p", float("nan")), ("repetition_penalty", float("nan"))]:
        problem = gen.Sampling(**{field: value}).problem()
        assert problem and problem[0] == field, (field, value, problem)
    assert gen.Sampling(temperature=1e-40).greedy and not gen.Sampling(temperature=0.2).greedy
    assert gen.Sampling(temperature=1e-40).problem() is None


class CountingTokenizer:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_text_stream_cost_does_not_grow_with_the_answer(tiny_models, arch):
    """Each new token decodes a bounded window, not the whole answer, and the text is the same as decoding
    the whole answer at once."""
    from phitune.models.loading import load_tokenizer
    tok = load_tokenizer(str(tiny_models[arch]))
    ids = tok("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(tok)
    s = TextStream(counting, ["lazy cat", "\nInstruct:"])
    shown = "".join(s.push(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1))
    assert shown == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 300 and max(counting.sizes) <= 16


def test_text_stream_matches_whole_decodes_of_real_tokenizers(shared_models):
    """Multi-byte characters, spaces and newlines come out as the whole decode has them (Phi-2's byte BPE,
    Phi-3.5's sentencepiece)."""
    from transformers import AutoTokenizer
    text = "Héllo wörld — 日本語のテキスト 🙂🙂 and\n\n  spaced   words, «quotes» . end"
    for name in ("phi-2", "phi-3.5-mini-instruct"):
        tok = AutoTokenizer.from_pretrained(str(shared_models / name))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        s = TextStream(tok, [])
        shown = "".join(s.push(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1))
        assert shown == tok.decode(ids, skip_special_tokens=True), name


def test_stop_string_at_the_end_of_a_long_answer_is_still_cut(tiny_models):
    from phitune.models.loading import load_tokenizer
    tok = load_tokenizer(str(tiny_models["llama"]))
    ids = tok("one two three " * 60 + "The code for red is one.", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, ["for red"])
    shown = ""
    for n in range(1, len(ids) + 1):
        shown += s.push(ids[:n])
        if s.hit:
            break
    assert s.hit and shown == "one two three " * 60 + "The code "


def test_a_non_joinable_request_is_not_starved_by_later_ones(tiny_models, tmp_path):
    """An adapter the stacked path cannot take (modules_to_save) waited for every base request, even those
    that arrived after it; now it gets the next batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phitune.data.templates import Template
    from phitune.models import adapters as adapters_io
    from phitune.models.loading import load_tokenizer
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["phi"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    tok = load_tokenizer(str(tiny_models["phi"]))
    adapters_io.save_adapter(model, tok, tmp_path / "m", {"base": {"model": str(tiny_models["phi"]),
                                                                    "model_type": "phi"},
                                                           "template": Template(tok).to_meta()})
    loaded = gen.load([f"m={tmp_path / 'm'}"], precision="fp32")
    engine = Engine(loaded)
    assert not engine.mixes_models
    ids = loaded.template_for(None).encode_prompt(RED)
    done = []
    lock = threading.Lock()

    def record(r):
        with lock:
            done.append(r)
    first = loaded.request(ids, None, gen.Sampling(max_new_tokens=10), stop_ids=[], on_done=record)
    tuned = loaded.request(ids, "m", gen.Sampling(max_new_tokens=6), stop_ids=[], on_done=record)
    # lengths that never end together, so that some base row is always running
    flood = [loaded.request(ids, None, gen.Sampling(max_new_tokens=4 + i % 3), stop_ids=[], on_done=record)
             for i in range(12)]
    scheduler = Scheduler(engine, max_batch=2)
    try:
        with scheduler._wake:  # arrival order: one base request, the adapter's, then a base flood
            for r in [first, tuned, *flood]:
                scheduler.submit(r)
        wait([first, tuned, *flood])
    finally:
        scheduler.close()
    assert all(r.finish_reason == "length" for r in done)
    assert done.index(tuned) <= 2, f"served after {done.index(tuned)} requests"  # at most one batch before it


def test_closing_the_app_stops_the_generation_thread(base):
    """Each app built in a TestClient context stops its thread on shutdown, and a long stream in flight
    ends promptly."""
    def threads():
        return [t for t in threading.enumerate() if t.name == "phitune-generate" and t.is_alive()]
    before = len(threads())
    for _ in range(3):
        with TestClient(build_app(base)) as c:
            assert c.get("/health").status_code == 200
    assert len(threads()) == before
    app = build_app(base, max_tokens_limit=100_000)
    scheduler = app.state.scheduler
    with TestClient(app) as c:
        r = base.request(ids_of(base), None, gen.Sampling(max_new_tokens=100_000), stop_ids=[])
        scheduler.submit(r)
        deadline = time.time() + 30
        while len(r.tokens) < 3 and time.time() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
    assert r.done and r.finish_reason in ("cancelled", "error")
    assert time.perf_counter() - started < 5
    assert len(threads()) == before


KEY = {"Authorization": "Bearer k"}


@pytest.mark.parametrize("body, param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": "x" * 101}, "stop"), ({"stop": ["ok", "y" * 200]}, "stop"),
])
def test_bad_sampling_and_stop_lists_are_400s(base, body, param):
    with TestClient(build_app(base, api_key="k")) as c:
        r = c.post("/v1/chat/completions", headers=KEY, json={"model": "base", "messages": RED, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"].startswith(param) and err["type"] == "invalid_request_error", err


def test_nan_temperature_is_a_400_naming_a_finite_number(base):
    with TestClient(build_app(base, api_key="k")) as c:
        r = c.post("/v1/chat/completions", headers={**KEY, "Content-Type": "application/json"},
                   content=b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        assert "finite" in r.json()["error"]["message"]


def test_tiny_temperature_over_http_answers_greedily(base):
    with TestClient(build_app(base, api_key="k")) as c:
        def ask(t):
            return c.post("/v1/chat/completions", headers=KEY,
                          json={"model": "base", "messages": RED, "temperature": t, "max_tokens": 8})
        tiny, greedy = ask(1e-40), ask(0)
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
        four = c.post("/v1/chat/completions", headers=KEY,
                      json={"model": "base", "messages": RED, "stop": ["a", "b", "c", "x" * 100], "max_tokens": 4})
        assert four.status_code == 200, four.text



def test_ctrl_c_does_not_wait_for_a_long_stream(tiny_models):
    """The real server (uvicorn, as `serve` runs it) asked to stop with a long stream in flight: the stream
    ends and the server is down within seconds, not after the stream's 100,000 tokens."""
    import http.client
    import json
    import socket

    from phitune.serving import routes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loaded = gen.load(model=str(tiny_models["llama"]), precision="fp32")
    loaded.model.config.max_position_embeddings = 200_000  # room for a stream of 100,000 tokens
    app = build_app(loaded, max_tokens_limit=100_000)
    server = routes.server(app, "127.0.0.1", port)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    got = []

    def client():
        body = {"model": "base", "messages": RED, "max_tokens": 100_000, "stream": True, "temperature": 0}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            while line := response.readline():
                got.append(line)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
    reader = threading.Thread(target=client, daemon=True)
    reader.start()
    while len(got) < 20 and time.time() < deadline:
        time.sleep(0.01)
    assert any(line.startswith(b"data: {") for line in got), got
    started = time.perf_counter()
    server.should_exit = True  # what uvicorn's SIGINT handler does
    serving.join(timeout=60)
    reader.join(timeout=60)
    assert not serving.is_alive() and not reader.is_alive()
    assert time.perf_counter() - started < routes.SHUTDOWN_GRACE_S + 5
    assert app.state.scheduler._thread.is_alive() is False
