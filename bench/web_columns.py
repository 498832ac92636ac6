"""What N columns of the page cost against one: the same question, greedy, streamed at once.

    python bench/web_columns.py --adapter_path runs/demo/final_adapter --columns 1 2 3 4
    python bench/web_columns.py --adapter_path runs/demo/final_adapter --screenshots docs/

On a machine shared with other work, run it with OMP_NUM_THREADS=1: with more threads than free cores,
torch's thread barriers stall and single runs take 10x longer at random.

Starts `phitune serve` with the base and the adapter served under N-1 names (the batch mixes the base
and adapter rows exactly as with N different adapters), then, for each column count, sends the streamed
chat requests the page sends, all at once, and times them until the last one ends. Each request asks for
exactly --max_tokens tokens' worth of work at most; the table gives the tokens each produced, so columns
that stopped early are visible. With --screenshots DIR, it also saves the page (compare and runs tabs)
as web-compare.png and web-runs.png, using Debian's chromium.
"""
import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"]


def start_server(args, names):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "phitune", "serve", "--port", str(port), "--precision", args.precision,
           "--max_batch", str(max(16, len(names) + 1))]
    for name in names:
        cmd += ["--adapter_path", f"{name}={args.adapter_path}"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return url, proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(proc.stderr.read()) from None
            time.sleep(0.5)
    raise SystemExit("phitune serve did not start")


def stream(url, model, question, max_tokens, out):
    """One streamed chat request; out gets (seconds to first text, seconds to end, completion tokens)."""
    body = json.dumps({"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": question}]}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0, first, tokens = time.perf_counter(), None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    out.append((first, time.perf_counter() - t0, tokens))


def columns_once(url, models, question, max_tokens):
    """All models asked at once, as the page does; (wall seconds until the last answer ends, per-model results)."""
    outs = [[] for _ in models]
    threads = [threading.Thread(target=stream, args=(url, m, question, max_tokens, o)) for m, o in zip(models, outs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, [o[0] for o in outs]


def screenshots(url, question, folder):
    from playwright.sync_api import sync_playwright
    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium", args=BROWSER_ARGS,
                                                   headless=True, viewport={"width": 1280, "height": 760})
        page = ctx.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#max_tokens", "80")
        page.fill("#input", question)
        page.press("#input", "Enter")
        page.wait_for_function("() => window.phitune.state.inFlight === 0 && "
                               "window.phitune.state.cols.every(c => c.history.length === 2)", timeout=600_000)
        page.click(".column:last-child .show-prompt")
        page.wait_for_function("() => document.querySelector('.column:last-child pre.prompt').textContent")
        page.screenshot(path=str(folder / "web-compare.png"))
        page.click(".tab[data-tab=runs]")
        page.wait_for_selector("#runs-tab[data-loaded]")
        page.set_viewport_size({"width": 1280, "height": 600})
        page.screenshot(path=str(folder / "web-runs.png"))
        ctx.close()
    print(f"screenshots: {folder / 'web-compare.png'}, {folder / 'web-runs.png'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter_path", required=True, help="an adapter directory (served under several names)")
    p.add_argument("--model", help="base model (default: the adapter's)")
    p.add_argument("--columns", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--question", default="Write one sentence describing this restaurant: name[The Wrestlers], "
                                         "eatType[pub], food[Chinese], priceRange[cheap], area[riverside]")
    p.add_argument("--all_base", action="store_true", help="every column asks the base model (answers of equal "
                   "length: the cost of batching alone)")
    p.add_argument("--screenshots", type=Path, help="save the page's screenshots into this folder and stop")
    args = p.parse_args()
    names = ["tuned"] if args.screenshots else [f"tuned-{i}" for i in range(1, max(args.columns))]
    url, proc = start_server(args, names)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    try:
        if args.screenshots:
            screenshots(url, args.question, args.screenshots)
            return
        models = ["base"] * max(args.columns) if args.all_base else ["base", *names]
        columns_once(url, models[:1], args.question, 4)  # warm-up: first-call costs out of the timings
        print(f"question: {args.question!r}; greedy, max_tokens {args.max_tokens}; {args.repeats} rounds, "
              f"column counts interleaved in each; columns: "
              f"{'base only' if args.all_base else 'base, then the adapter under new names'}")
        walls, tokens = {n: [] for n in args.columns}, {}
        for _ in range(args.repeats):  # interleaved, so that a burst of other load hits every count alike
            for n in args.columns:
                wall, results = columns_once(url, models[:n], args.question, args.max_tokens)
                walls[n].append(wall)
                tokens[n] = [t for _, _, t in results]
        one = min(walls[args.columns[0]])
        print(f"| columns | wall s, best | wall s, median | best x {args.columns[0]} column(s) | tokens per column |")
        print("|---|---|---|---|---|")
        for n in args.columns:
            print(f"| {n} | {min(walls[n]):.2f} | {statistics.median(walls[n]):.2f} | {min(walls[n]) / one:.2f} | "
                  f"{', '.join(map(str, tokens[n]))} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
