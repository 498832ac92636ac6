"""The page of `phitune serve` in a real browser (Debian's chromium driven by Playwright).

One server (tiny llama base + the memorised adapter, with --api-key) and one browser for the module;
each test opens a fresh tab, which asks for the key like a new visitor's would.
"""
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import sync_playwright

from conftest import ROOT, run_cli

KEY = "web-key-7"
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"]
RED = "Say the code for red"
DONE = "s => window.phitune && window.phitune.state.inFlight === 0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, key=KEY, headers=None, data=None):
    """(status, body) of a GET, or of a POST of `data`."""
    req = urllib.request.Request(url, data=data, headers={**({"Authorization": f"Bearer {key}"} if key else {}),
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_server(*argv, command="serve"):
    """`phitune serve ARGV --api-key KEY` (or `phitune compare ARGV`) on a free port; returns (base url,
    process) once it answers."""
    port = free_port()
    key = ["--api-key", KEY] if command == "serve" else []
    proc = subprocess.Popen([sys.executable, "-m", "phitune", command, *map(str, argv), "--port", str(port), *key],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if get(f"{url}/health", key=None)[0] == 200:
                return url, proc
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("phitune serve did not start")


def stop_server(proc):
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(memorised_adapter):
    url, proc = start_server("--adapter_path", f"tuned={memorised_adapter}", "--max_tokens_limit", 1500,
                             "--precision", "fp32")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=BROWSER_ARGS,
                                                   headless=True, viewport={"width": 1280, "height": 800},
                                                   accept_downloads=True)
        yield ctx
        ctx.close()


def open_page(ctx, url, width=1280, height=800):
    """A fresh tab on the page; it asks for the key (sessionStorage is per tab) and the test gives it."""
    page = ctx.new_page()
    page.set_viewport_size({"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("body[data-ready='1']")
    page.errors = errors
    return page


def ask(page, question, max_tokens=30, timeout=60_000):
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#input", question)
    turns = page.evaluate("() => window.phitune.state.cols.map(c => c.history.length)")
    page.press("#input", "Enter")
    # every column has its answer (answers can be done before a poll would see them in flight)
    page.wait_for_function("n => window.phitune.state.inFlight === 0 && "
                           "window.phitune.state.cols.every((c, i) => c.history.length === n[i] + 2)",
                           arg=turns, timeout=timeout)


def history(page):
    return page.evaluate("() => Object.fromEntries(window.phitune.state.cols.map(c => [c.name, c.history]))")


def plain_greedy(model, tokenizer, prompt_ids, stop_ids, n):
    """Reference decode: plain transformers generate, one prompt, no padding."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def reference_answers(model_dir, adapter_dir, question, n):
    """(base, tuned) greedy answers from freshly loaded models, each as (text, hit the limit?)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.data.templates import Template
    from phitune.models import loading as models
    tok = models.load_tokenizer(str(model_dir))
    meta = json.loads((Path(adapter_dir) / "phitune.json").read_text())
    out = []
    for tuned in (False, True):
        template = Template.from_meta(tok, meta["template"]) if tuned else Template(tok, "auto")
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if tuned:
            net = PeftModel.from_pretrained(net, adapter_dir)
        stops = template.stop_token_ids()
        ids = plain_greedy(net.eval(), tok, template.encode_prompt([{"role": "user", "content": question}]), stops, n)
        out.append((tok.decode(ids, skip_special_tokens=True).strip(), len(ids) == n and ids[-1] not in stops))
    return out


def test_every_column_streams_at_once_and_base_is_really_base(server, browser, tiny_models, memorised_adapter):
    page = open_page(browser, server)
    heads = page.locator(".column h2").all_text_contents()
    assert heads == ["base", "tuned"]
    tuned_head = page.locator(".column[data-model=tuned] .col-head").text_content()
    assert "LoRA rank 16" in tuned_head and "trained 60 steps" in tuned_head and "on 4 examples" in tuned_head
    assert str(tiny_models["llama"]) in page.locator(".column[data-model=base] .col-head").text_content()

    ask(page, RED, max_tokens=30)
    h = history(page)
    (base_text, base_cut), (tuned_text, tuned_cut) = reference_answers(tiny_models["llama"], memorised_adapter, RED, 30)
    assert h["tuned"][-1]["content"] == tuned_text == "The code for red is one."
    assert h["base"][-1]["content"].strip() == base_text != tuned_text  # the base column has no LoRA in it
    shown = page.locator(".column[data-model=tuned] .assistant .text").text_content()
    assert shown == "The code for red is one."
    # all requests were sent before any finished, and the answers came in pieces
    stats = [h[name][-1]["stats"] for name in ("base", "tuned")]
    assert max(s["sent_at"] for s in stats) < min(s["done_at"] for s in stats)
    assert stats[1]["pieces"] > 3 and stats[1]["tokens"] > 3 and stats[1]["finish_reason"] == "stop"
    tuned_stats = page.locator(".column[data-model=tuned] .stats").text_content()
    assert "tokens/s" in tuned_stats and "first token" in tuned_stats and "ended: stop token" in tuned_stats
    base_stats = page.locator(".column[data-model=base] .stats")
    assert (base_stats.locator(".warn").count() == 1) == base_cut  # the visible "hit the token limit" warning
    if base_cut:
        assert "hit the token limit (30)" in base_stats.text_content()

    # the exact prompt the tuned model received, special tokens visible
    page.click(".column[data-model=tuned] .show-prompt")
    page.wait_for_function("() => document.querySelector('.column[data-model=tuned] pre.prompt').textContent")
    prompt = page.locator(".column[data-model=tuned] pre.prompt").text_content()
    assert prompt == f"<|im_start|>user\n{RED}<|im_end|>\n<|im_start|>assistant\n"
    assert "generation stops at <|im_end|>" in page.locator(".column[data-model=tuned] .prompt-meta").text_content()
    assert not page.errors
    page.close()


def test_multi_turn_regenerate_export_and_eval_reads_it(server, browser, memorised_adapter, tmp_path):
    page = open_page(browser, server)
    ask(page, RED, max_tokens=20)
    ask(page, "Say the code for blue", max_tokens=20)
    h = history(page)
    assert [m["role"] for m in h["tuned"]] == ["user", "assistant"] * 2
    second = h["tuned"][3]["content"]
    assert second and h["tuned"][1]["content"] == "The code for red is one."
    # each column keeps its own history: the base model's prompt holds the base's first answer
    page.click(".column[data-model=base] .show-prompt")
    page.wait_for_function("() => document.querySelector('.column[data-model=base] pre.prompt').textContent")
    base_prompt = page.locator(".column[data-model=base] pre.prompt").text_content()
    assert h["base"][1]["content"] in base_prompt and "The code for red is one." not in base_prompt
    assert base_prompt.endswith("Say the code for blue<|im_end|>\n<|im_start|>assistant\n")

    before = h["base"][3]["stats"]["done_at"]
    page.click(".column[data-model=tuned] .regen")
    page.wait_for_function("() => window.phitune.state.inFlight === 0 && "
                           "window.phitune.state.cols[1].history.length === 4")
    h2 = history(page)
    assert h2["tuned"][3]["content"] == second  # greedy: the same answer again
    assert h2["tuned"][3]["stats"]["done_at"] > h["tuned"][3]["stats"]["done_at"]
    assert h2["base"][3]["stats"]["done_at"] == before  # the other column did not run again
    assert page.locator(".column[data-model=tuned] .turn").count() == 2

    with page.expect_download() as download:
        page.click("#export")
    out = tmp_path / "session.jsonl"
    download.value.save_as(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["messages"][-1] == {"role": "assistant", "content": second}
    assert rows[1]["messages"][:3] == [{"role": "user", "content": RED},
                                       {"role": "assistant", "content": "The code for red is one."},
                                       {"role": "user", "content": "Say the code for blue"}]
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"] * 2
    assert set(rows[0]["answers"]) == {"base", "tuned"} and rows[0]["settings"]["temperature"] == 0
    assert rows[0]["finish_reasons"]["tuned"] == "stop"
    assert run_cli("eval", "--adapter_path", f"tuned={memorised_adapter}", "--data", out, "--no_generate",
                   "--output", tmp_path / "scores.json") == 0
    assert json.loads((tmp_path / "scores.json").read_text())

    page.reload()  # the key and the session survive a reload of the tab: no empty columns, no new question
    page.wait_for_selector("body[data-ready='1']")
    assert history(page) == h2 and page.locator(".column[data-model=base] .turn").count() == 2
    assert page.locator(".column[data-model=tuned] .assistant .text").all_text_contents()[-1] == second

    page.click("#clear")
    assert page.locator(".turn").count() == 0 and history(page) == {"base": [], "tuned": []}
    page.close()


def test_stop_cancels_the_generation_on_the_server(server, browser):
    page = open_page(browser, server)
    page.fill("#max_tokens", "1400")
    page.fill("#input", "one two three")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.column[data-model=base] .assistant .text').textContent")
    assert json.loads(get(f"{server}/health")[1])["active"] >= 1
    page.click("#stop")
    page.wait_for_function(DONE)
    stopped = time.time()
    while json.loads(get(f"{server}/health")[1])["active"] and time.time() - stopped < 5:
        time.sleep(0.05)
    assert json.loads(get(f"{server}/health")[1])["active"] == 0 and time.time() - stopped < 3
    h = history(page)
    assert h["base"][-1]["stats"]["finish_reason"] == "cancelled"
    assert "stopped by you" in page.locator(".column[data-model=base] .stats").text_content()
    page.fill("#input", "one two three")  # Clear in the middle of an answer: stopped, and nothing kept
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.column[data-model=base] .assistant .text')[1]"
                           ".textContent")
    page.click("#clear")
    page.wait_for_function(DONE)
    assert history(page) == {"base": [], "tuned": []} and page.locator(".turn").count() == 0
    started = time.time()  # the next question is answered at once and right: nothing left over on the server
    ask(page, RED, max_tokens=20)
    assert time.time() - started < 10 and history(page)["tuned"][-1]["content"] == "The code for red is one."
    page.close()


def test_text_from_models_and_users_is_never_html(server, browser):
    page = open_page(browser, server)
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 1">'
    page.fill("#system_prompt", evil)
    page.click(".column[data-model=base] .show-prompt")
    page.wait_for_function("() => document.querySelector('.column[data-model=base] pre.prompt').textContent")
    assert evil in page.locator(".column[data-model=base] pre.prompt").text_content()

    # an answer with markup, streamed to the page as the server would stream it
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}]}
              for piece in ("Here: ", "<script>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 1">')]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 3}})
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=sse,
                                                                     content_type="text/event-stream"))
    ask(page, evil, max_tokens=5)
    for name in ("base", "tuned"):
        col = page.locator(f".column[data-model={name}]")
        assert col.locator(".assistant .text").text_content() == "Here: " + evil
        assert col.locator(".user").text_content() == evil
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("() => window.pwned") is None
    page.close()


def test_a_stream_that_ends_without_done_is_a_lost_connection(server, browser):
    """The server went away mid-answer: the stream ends without [DONE]. That is not "stopped by you"."""
    page = open_page(browser, server)
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Half an ans"}, "finish_reason": None}]}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, body=f"data: {json.dumps(chunk)}\n\n", content_type="text/event-stream"))
    ask(page, "one two three", max_tokens=5)
    h = history(page)
    for name in ("base", "tuned"):
        stats = page.locator(f".column[data-model={name}] .stats").text_content()
        assert "connection lost" in stats and "stopped by you" not in stats
        assert h[name][-1]["content"] == "Half an ans" and h[name][-1]["stats"]["finish_reason"] == "lost"
    assert not page.errors
    page.close()


def test_runs_tab_draws_the_curves_of_metrics_jsonl(server, browser, memorised_adapter):
    rows = [json.loads(line) for line in (memorised_adapter.parent / "metrics.jsonl").read_text().splitlines()]
    page = open_page(browser, server)
    page.click(".tab[data-tab=runs]")
    page.wait_for_selector("#runs-tab[data-loaded=tuned]")
    loss = page.locator("#loss-chart")
    assert int(loss.get_attribute("data-train-points")) == len([r for r in rows if "loss" in r]) == 60
    assert int(page.locator("#lr-chart").get_attribute("data-lr-points")) == len([r for r in rows if "lr" in r])
    # the training curve is really drawn: pixels of its colour on the canvas
    blue = page.evaluate("""() => { const c = document.querySelector('#loss-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 80 && d[i + 1] > 80 && d[i + 1] < 130 && d[i + 2] > 200) n++;
        return n; }""")
    assert blue > 200
    summary = page.locator("#run-summary").text_content()
    assert "steps60" in summary.replace(" ", "") and "selectedlast step" in summary
    assert "learning_rate0.03" in page.locator("#run-settings").text_content()
    page.close()


def test_keyboard_narrow_window_and_scrolling(server, browser):
    page = open_page(browser, server, width=480, height=640)
    boxes = [page.locator(f".column[data-model={n}]").bounding_box() for n in ("base", "tuned")]
    assert boxes[1]["y"] >= boxes[0]["y"] + boxes[0]["height"] - 1 and boxes[1]["x"] == boxes[0]["x"]  # stacked
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.type("#input", "second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert history(page)["base"] == []  # Shift+Enter did not send
    page.fill("#input", "")
    for i in range(4):
        ask(page, f"one two three {i}", max_tokens=60)
    turns = {n: page.locator(f".column[data-model={n}] .turns") for n in ("base", "tuned")}
    assert turns["base"].evaluate("t => t.scrollHeight > t.clientHeight")
    turns["base"].evaluate("t => { t.scrollTop = 0; }")  # the reader scrolls up to read the first answer
    ask(page, "one two three again", max_tokens=60)
    assert turns["base"].evaluate("t => t.scrollTop") == 0
    assert turns["tuned"].evaluate("t => t.scrollHeight - t.scrollTop - t.clientHeight < 8")  # followed along
    page.close()


def test_page_and_static_files_load_without_key_but_api_needs_it(server):
    assert get(f"{server}/", key=None)[0] == 200 and get(f"{server}/static/app.js", key=None)[0] == 200
    for path in ("/phitune/info", "/phitune/runs", "/phitune/runs/tuned", "/v1/models"):
        assert get(f"{server}{path}", key=None)[0] == 401
        assert get(f"{server}{path}")[0] == 200
    assert "textContent" in get(f"{server}/static/app.js")[1].decode() and \
        "innerHTML" not in get(f"{server}/static/app.js")[1].decode()


def test_run_dir_flag_adds_a_run_in_progress(memorised_adapter, tmp_path):
    """--run_dir shows a run that has no final_adapter yet (its metrics so far); routes need the key."""
    import shutil

    from fastapi.testclient import TestClient

    from phitune.generation import load as gen
    from phitune.serving.routes import build_app
    live = tmp_path / "live-run"
    live.mkdir()
    shutil.copy(memorised_adapter.parent / "metrics.jsonl", live / "metrics.jsonl")
    with open(live / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 61, "loss": 0.4')  # the line being written right now
    app = build_app(gen.load([f"tuned={memorised_adapter}"]), api_key=KEY, run_dirs=[live])
    with TestClient(app) as client:
        assert client.get("/phitune/runs").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        runs = client.get("/phitune/runs", headers=auth).json()["runs"]
        assert [r["name"] for r in runs] == ["tuned", "live-run"]
        run = client.get("/phitune/runs/live-run", headers=auth).json()
        assert len(run["rows"]) == 60 and run["unreadable_lines"] == 1 and run["finished"] is False
        assert run["summary"]["steps"] == 60
        assert client.get("/phitune/runs/nope", headers=auth).status_code == 404
        bad = client.post("/phitune/render", headers=auth, json={"model": "ghost", "messages": []})
        assert bad.status_code == 404 and "ghost" in bad.json()["error"]["message"]


def test_compare_web_serves_the_same_page(browser, memorised_adapter):
    url, proc = start_server("--adapter_path", f"tuned={memorised_adapter}", "--web", command="compare")
    try:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")  # localhost only, no key asked
        assert page.locator(".column h2").all_text_contents() == ["base", "tuned"]
        ask(page, RED, max_tokens=20)
        assert history(page)["tuned"][-1]["content"] == "The code for red is one."
        page.close()
        # no key here: other sites must not reach it (DNS rebinding, cross-origin and text/plain posts)
        port = url.rsplit(":", 1)[1]
        assert get(f"{url}/phitune/info", key=None, headers={"Host": f"attacker.example:{port}"})[0] == 403
        body = json.dumps({"model": "tuned", "messages": [{"role": "user", "content": RED}]}).encode()
        for headers, want in (({"Origin": "http://attacker.example", "Content-Type": "application/json"}, 403),
                              ({"Content-Type": "text/plain"}, 415), ({"Content-Type": "application/json"}, 200)):
            assert get(f"{url}/v1/chat/completions", key=None, headers=headers, data=body)[0] == want, headers
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_demo_model_base_and_tuned_side_by_side(browser, tmp_path):
    """The real demo model: the base column says what the plain base model says; the tuned one its adapter's."""
    run = tmp_path / "demo"
    assert run_cli("train", "--model", "smollm2-135m-instruct", "--dataset_path", ROOT / "examples/e2e_demo.jsonl",
                   "--output_dir", run, "--max_steps", 2, "--batch_size", 2, "--gradient_accumulation_steps", 1,
                   "--max_length", 96, "--lora_r", 8, "--val_split", 0, "--learning_rate", 2e-3,
                   "--no-gradient_checkpointing") == 0
    url, proc = start_server("--adapter_path", f"e2e={run / 'final_adapter'}", "--precision", "fp32")
    try:
        page = open_page(browser, url)
        question = "What is the capital of France?"
        ask(page, question, max_tokens=24, timeout=120_000)
        h = history(page)
        assert page.locator(".column h2").all_text_contents() == ["base", "e2e"]
        page.close()
    finally:
        stop_server(proc)
    from phitune.generation import load as gen
    conversation = [[{"role": "user", "content": question}]]
    greedy = gen.Sampling(max_new_tokens=24)
    fresh_base = gen.load([], model="smollm2-135m-instruct", precision="fp32")  # no adapter anywhere
    base = gen.generate(fresh_base, conversation, greedy)[0].text
    del fresh_base
    tuned_model = gen.load([f"e2e={run / 'final_adapter'}"], precision="fp32")
    tuned = gen.generate(tuned_model, conversation, greedy, adapter="e2e")[0].text
    assert "Paris" in h["base"][-1]["content"]
    assert h["base"][-1]["content"] == base and h["e2e"][-1]["content"] == tuned
