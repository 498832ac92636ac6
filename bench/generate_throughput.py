"""Generation speed on the demo model, every figure in one run on one machine.

    .venv/bin/python bench/generate_throughput.py [--questions 16] [--max_new_tokens 48]

1. Single stream, greedy, one adapter: phitune's chat path vs plain `model.generate` on the model with the
   adapter attached as PEFT attaches it (fp32), interleaved prompt by prompt; medians of tokens/s and time to
   first token. Beside it, llama.cpp (node-llama-cpp) on the same weights exported to GGUF, and on the
   original Q4_1 file of the base model.
2. compare/eval: base + two adapters over many questions, all models in the same batches vs one model at a
   time (the previous way), same engine otherwise.
3. serve: a `phitune serve` process; 8 concurrent streaming clients, base and adapter requests mixed, vs the
   same requests one at a time; aggregate tokens/s, first-token latency (median, p95), and whether every
   answer equals its serial one.
Writes bench/generate_throughput.json.
"""
import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
sys.path.insert(0, str(ROOT / "tests"))


def cpu_name():
    from phitune.models.loading import cpu_has_fast_bf16
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())
    kind = "native bf16: AVX512-BF16 or AMX" if cpu_has_fast_bf16() else "no native bf16"
    return f"{name} ({kind}), {torch.get_num_threads()} threads"


def make_adapter(model_dir, out, seed):
    """A random r16 all-linear adapter on the demo model, saved as phitune saves adapters."""
    from test_engine import random_adapter
    return random_adapter(model_dir, out, seed, "llama")


class Clock:
    """A generate() streamer that only notes when each put() happens (#1 is the prompt, #2 the first token)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def questions(n):
    with open(DATA, newline="", encoding="utf-8") as fh:
        mrs = list(dict.fromkeys(r["mr"] for r in csv.DictReader(fh)))[:n]
    return [[{"role": "user", "content": f"Describe this restaurant in one sentence: {mr}"}] for mr in mrs]


def single_stream(model_dir, adapter, convs, n_new):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.generation import load as gen
    chats = {"phitune": gen.load([adapter], precision="auto", merge=True),  # what `phitune chat` runs
             "phitune_int8": gen.load([adapter], precision="int8", merge=True)}  # `phitune chat --precision int8`
    fast = chats["phitune"]
    tok = fast.tokenizer
    plain_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    sampling = gen.Sampling(max_new_tokens=n_new)
    rows = {"plain": [], **{k: [] for k in chats}}
    for conv in [convs[0]] + convs:  # the first prompt warms every system up and is not counted
        ids = fast.template.encode_prompt(conv)
        x = torch.tensor([ids])
        first = Clock()
        t = time.perf_counter()
        with torch.no_grad():
            out = plain_model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                       max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id,
                                       streamer=first)
        total = time.perf_counter() - t
        plain = (out.shape[1] - x.shape[1], first.times[1] - t, total)  # put() #1 is the prompt, #2 the first token
        rows["plain"].append(plain)
        for name, loaded in chats.items():
            req = loaded.request(ids, None, sampling, stop_ids=[])  # same token count as plain: no early stop
            t = time.perf_counter()
            loaded.engine.run([req], 1)
            rows[name].append((len(req.tokens), req.first_token_s, time.perf_counter() - t, req.tokens))
    rows = {k: v[1:] for k, v in rows.items()}
    summary = {k: {"tokens_per_s": statistics.median(r[0] / r[2] for r in v),
                   "first_token_ms": 1000 * statistics.median(r[1] for r in v), "runs": len(v)}
               for k, v in rows.items()}
    for name in chats:
        summary[name]["speedup"] = summary[name]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    summary["speedup"] = summary["phitune"]["speedup"]
    summary["weights"] = str(next(fast.model.parameters()).dtype)
    # How often int8 gives the same greedy tokens as the default weights (same prompt, same length).
    same = [a[3] == b[3] for a, b in zip(rows["phitune"], rows["phitune_int8"])]
    summary["int8_same_tokens_as_default"] = f"{sum(same)}/{len(same)}"
    return summary, fast


def llamacpp(gguf, prompts_ids, n_new, threads):
    runner = ROOT / "tools" / "llamacpp"
    if not (runner / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund"], cwd=runner,
                       check=True, capture_output=True)
    request = {"model": str(gguf), "context": 1024, "threads": threads,
               "generate": [{"ids": ids, "max_tokens": n_new} for ids in [prompts_ids[0]] + prompts_ids]}
    r = subprocess.run(["node", str(runner / "run.mjs")], input=json.dumps(request), capture_output=True, text=True,
                       check=True)
    gens = json.loads(r.stdout)["generated"][1:]
    return {"tokens_per_s": statistics.median(len(g["ids"]) / (g["ms_total"] / 1000) for g in gens),
            "first_token_ms": statistics.median(g["ms_first"] for g in gens), "runs": len(gens),
            "mean_tokens": statistics.mean(len(g["ids"]) for g in gens)}


def compare_batching(model_dir, adapters, convs, n_new, precision):
    from phitune.generation import load as gen
    loaded = gen.load([f"a={adapters[0]}", f"b={adapters[1]}"], precision=precision)
    sampling = gen.Sampling(max_new_tokens=n_new)
    columns = [None, "a", "b"]
    gen.generate_jobs(loaded, [(convs[0], c, sampling) for c in columns])  # warm up
    t = time.perf_counter()
    together = gen.generate_jobs(loaded, [(c, col, sampling) for col in columns for c in convs], batch_size=16)
    mixed_s = time.perf_counter() - t
    t = time.perf_counter()
    apart = [a for col in columns for a in gen.generate(loaded, convs, sampling, adapter=col, batch_size=16)]
    apart_s = time.perf_counter() - t
    tokens = sum(a.tokens for a in together)
    return {"models": 3, "questions": len(convs), "tokens": tokens, "mixed_batches_s": mixed_s,
            "one_model_at_a_time_s": apart_s, "speedup": apart_s / mixed_s,
            "same_answers": [a.text for a in together] == [a.text for a in apart]}


def server(model_dir, adapters, convs, n_new, precision, clients=8):
    """A real `phitune serve` process; the clients are threads of this process, talking HTTP to it."""
    import socket
    import urllib.error
    import urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "phitune", "serve", "--adapter_path", f"tuned={adapters[0]}",
                             "--precision", precision, "--port", str(port), "--max_tokens_limit", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        bodies = [{"model": "base" if i % 2 else "tuned", "temperature": 0, "max_tokens": n_new, "stream": True,
                   "messages": convs[i % len(convs)]} for i in range(clients)]

        def one(body):
            began, first, text, tokens = time.perf_counter(), None, "", 0
            request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        piece = event["choices"][0].get("delta", {}).get("content")
                        if piece:
                            first = first or time.perf_counter() - began
                            text += piece
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
            return text, tokens, first
        one(bodies[0])  # warm up
        t = time.perf_counter()
        serial = [one(b) for b in bodies]
        serial_s = time.perf_counter() - t
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            together = list(pool.map(one, bodies))
        together_s = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    firsts = sorted(f for _, _, f in together)
    tokens = sum(n for _, n, _ in together)
    return {"clients": clients, "tokens": tokens, "concurrent_tokens_per_s": tokens / together_s,
            "serial_tokens_per_s": sum(n for _, n, _ in serial) / serial_s,
            "speedup": (tokens / together_s) / (sum(n for _, n, _ in serial) / serial_s),
            "first_token_ms_median": 1000 * statistics.median(firsts),
            "first_token_ms_p95": 1000 * firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))],
            "serial_first_token_ms_median": 1000 * statistics.median(f for _, _, f in serial),
            "same_answers_as_serial": [x[0] for x in together] == [x[0] for x in serial]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--precision", default="auto", help="weights for the compare and serve parts")
    ap.add_argument("--skip", nargs="*", default=[], choices=["single", "llamacpp", "compare", "serve"])
    args = ap.parse_args()
    from phitune.models.loading import _find_demo_gguf, provision_demo
    model_dir = str(provision_demo())
    convs = questions(args.questions)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "max_new_tokens": args.max_new_tokens,
              "precision_batched": args.precision}
    print(f"machine: {result['cpu']}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = [make_adapter(model_dir, tmp / f"adapter{i}", i) for i in (1, 2)]
        if "single" not in args.skip:
            result["single_stream"], fast = single_stream(model_dir, adapters[0], convs[:6], args.max_new_tokens)
            s = result["single_stream"]
            print(f"single stream: plain generate with PEFT {s['plain']['tokens_per_s']:.1f} tok/s (first token "
                  f"{s['plain']['first_token_ms']:.0f} ms)")
            labels = (("phitune", f"chat, weights {s['weights']}"), ("phitune_int8", "chat --precision int8"))
            for name, label in labels:
                print(f"  phitune {label}: {s[name]['tokens_per_s']:.1f} tok/s (first token "
                      f"{s[name]['first_token_ms']:.0f} ms): {s[name]['speedup']:.2f}x")
            print(f"  int8 answers token-identical to the default weights: {s['int8_same_tokens_as_default']}")
            if "llamacpp" not in args.skip:
                ids = [fast.template.encode_prompt(c) for c in convs[:6]]
                merged = tmp / "tuned-f16.gguf"
                subprocess.run([sys.executable, "-m", "phitune", "export", "--adapter_path", str(adapters[0]),
                                "--outtype", "f16", "--output", str(merged)], check=True, capture_output=True)
                with tempfile.TemporaryDirectory() as gdir:
                    q4 = _find_demo_gguf(Path(gdir))
                    result["llamacpp"] = {"tuned_f16": llamacpp(merged, ids, args.max_new_tokens, 2),
                                          "base_q4_1": llamacpp(q4, ids, args.max_new_tokens, 2)}
                for k, v in result["llamacpp"].items():
                    print(f"llama.cpp {k} (2 threads): {v['tokens_per_s']:.1f} tok/s (first token "
                          f"{v['first_token_ms']:.0f} ms, {v['mean_tokens']:.0f} tokens per answer)")
        if "compare" not in args.skip:
            result["compare"] = [compare_batching(model_dir, adapters, convs[:n], args.max_new_tokens, args.precision)
                                 for n in sorted({4, len(convs)})]
            for c in result["compare"]:
                print(f"compare, base + 2 adapters x {c['questions']} questions: all models in one engine run "
                      f"{c['mixed_batches_s']:.1f} s vs one model at a time {c['one_model_at_a_time_s']:.1f} s: "
                      f"{c['speedup']:.2f}x (same answers: {c['same_answers']})")
        if "serve" not in args.skip:
            v = result["serve"] = server(model_dir, adapters, convs, args.max_new_tokens, args.precision)
            print(f"serve, {v['clients']} concurrent streaming clients (base and adapter mixed): "
                  f"{v['concurrent_tokens_per_s']:.1f} tok/s vs {v['serial_tokens_per_s']:.1f} one at a time: "
                  f"{v['speedup']:.2f}x; first token median {v['first_token_ms_median']:.0f} ms, p95 "
                  f"{v['first_token_ms_p95']:.0f} ms; same answers as serial: {v['same_answers_as_serial']}")
    out = ROOT / "bench" / ("generate_throughput.json" if args.precision == "auto" else
                            f"generate_throughput.{args.precision}.json")
    kept = json.loads(out.read_text()) if out.is_file() and args.skip else {}  # parts skipped keep their figures
    out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
