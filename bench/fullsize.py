"""Full-size Phi-2 and Phi-3.5-mini through every phitune command, on random weights: `make fullsize`.

    make fullsize                  # or: python bench/fullsize.py [--models phi-2,phi-3.5-mini-instruct]
                                   #   [--layers 2] [--only plan,train,merge,chat,compare,serve,export]

For each model, from its real config and tokenizer (../shared/models beside the checkout; PHITUNE_SHARED_MODELS
overrides):
 0. a model directory with seeded random weights at full size (bf16 safetensors + the real tokenizer files),
    built once per machine under ~/.cache/phitune/fullsize/<name> and reused;
 1. `phitune plan --measure` on the config-only directory at two shapes (batch x tokens): estimate against
    the measured peak and step time; the train pre-flight's estimate beside them;
 2. `phitune train` two optimizer steps on the built model at the precision the hardware path picks, its
    peak resident memory against the pre-flight estimate, and the weights line of its header;
 3. `phitune merge`, `chat --prompt`, `compare` (two questions) and `serve` (one HTTP request) with the
    adapter, each in its own process with its peak resident memory;
 4. `phitune export --outtype f16` and `q8_0`: llama.cpp (tools/llamacpp/run.mjs) loads each file; its greedy
    tokens and next-token distributions on a few prompts are compared with the merged transformers model
    (f16 file against the merged weights rounded to f16; q8_0 against float32): greedy tokens equal for the
    first 16, top-1 agreement per position (teacher-forced along the transformers continuation), max
    |log-prob difference| over llama.cpp's 20 most likely tokens, and the transformers top-1/top-2 margin
    where they disagree (random weights make near-ties likely).
Writes bench/fullsize.json and prints a markdown table. Every command runs as a child process; peak memory
is its maximum resident set size (wait4's rusage). --layers N shrinks the configs (same widths, N decoder
layers) to develop on; those figures say nothing about full size. Runtime and memory: docs/benchmarks.md.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("phi-2", "phi-3.5-mini-instruct")
SHAPES = ((1, 128), (4, 256))  # (batch, tokens) for plan --measure; train runs the first
STEPS = ("plan", "train", "merge", "chat", "compare", "serve", "export")
SEED = 1234
PROMPTS = ["Write one sentence describing this restaurant: name[The Eagle], food[French], area[riverside]",
           "What is the capital of France?",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
N_GREEDY = 16
WORDS = ("the river eagle coffee shop food french english rating price area city centre family friendly near "
         "restaurant serves cheap moderate high low customer five stars located children welcome pub chinese "
         "indian italian japanese fast burger wine bar riverside station market garden view").split()
GIB = 2 ** 30
# Memory each command needs, in bytes per model parameter beyond the runtime, for the guard that skips a
# step this machine cannot hold now (instead of waking the OOM killer on a shared machine): every command
# loads the weights in fp32 first; merge keeps its bf16 copy while it reloads the written model in fp32,
# export holds the encoded file (f16) beside the fp32 model.
NEED = {"train": 4, "merge": 6, "chat": 4, "compare": 4, "serve": 4, "export": 6}


def shared_models() -> Path:
    """The real configs and tokenizers: $PHITUNE_SHARED_MODELS, <repo>/../shared/models, /work/shared/models."""
    for p in (os.environ.get("PHITUNE_SHARED_MODELS"), ROOT.parent / "shared" / "models", "/work/shared/models"):
        if p and Path(p).is_dir():
            return Path(p)
    sys.exit("fullsize: no ../shared/models beside the checkout (set PHITUNE_SHARED_MODELS)")


def cache() -> Path:
    return Path(os.environ.get("PHITUNE_CACHE", Path.home() / ".cache" / "phitune")) / "fullsize"


def config_dir(name: str, layers: int | None) -> Path:
    """A config-only copy of the model (config.json, tokenizer files; no weights), layers overridden."""
    src = shared_models() / name
    dst = cache() / (name + (f"-L{layers}" if layers else "")) / "config-only"
    config = json.loads((src / "config.json").read_text())
    if layers:
        config["num_hidden_layers"] = layers
    text = json.dumps(config, indent=2)
    if (dst / "config.json").is_file() and (dst / "config.json").read_text() == text:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "README.md"):
            shutil.copyfile(f, dst / f.name)
    (dst / "config.json").write_text(text)
    return dst


def model_dir(name: str, layers: int | None) -> Path:
    """The random-weight model (bf16 safetensors + tokenizer), built once: seeded, reused when its stamp matches."""
    cfg_dir = config_dir(name, layers)
    dst = cfg_dir.parent / "model"
    stamp = {"seed": SEED, "config": json.loads((cfg_dir / "config.json").read_text()), "dtype": "bfloat16"}
    if (dst / "fullsize.json").is_file() and json.loads((dst / "fullsize.json").read_text()) == stamp:
        return dst
    print(f"fullsize: building {dst} (random weights, seed {SEED}; once per machine)", flush=True)
    code = ("import sys, torch, transformers as t\n"
            "cfg = t.AutoConfig.from_pretrained(sys.argv[1]); torch.manual_seed(int(sys.argv[3]))\n"
            "m = t.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)\n"
            "m.save_pretrained(sys.argv[2], max_shard_size='2GB')\n")
    tmp = dst.with_name("model.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    r = run([sys.executable, "-c", code, str(cfg_dir), str(tmp), str(SEED)], "build")
    if r["rc"] != 0:
        sys.exit(f"fullsize: building {name} failed:\n{r['stderr'][-2000:]}")
    for f in cfg_dir.iterdir():
        if f.name != "config.json" and not (tmp / f.name).exists():
            shutil.copyfile(f, tmp / f.name)
    (tmp / "fullsize.json").write_text(json.dumps(stamp))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def dataset(cfg_dir: Path, tokens: int, n: int, path: Path) -> Path:
    """n prompt/response pairs that each reach `tokens` under the model's template (training truncates them
    to exactly --max_length `tokens`): a prompt of a fifth of that, an answer of as many words as tokens."""
    import random
    rnd = random.Random(SEED + tokens)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            prompt = "Describe: " + " ".join(rnd.choice(WORDS) for _ in range(tokens // 5))
            answer = " ".join(rnd.choice(WORDS) for _ in range(tokens)).capitalize() + "."
            fh.write(json.dumps({"prompt": prompt, "response": answer}) + "\n")
    return path


# ---------------------------------------------------------------- children

def run(cmd: list, label: str, timeout: float = 7200, stdin: Path | None = None) -> dict:
    """Run cmd as a child: {"rc", "stdout", "stderr", "seconds", "peak_rss", "peak_anon"} (bytes). peak_rss is
    wait4's maximum resident set size (mapped weight files included); peak_anon the largest anonymous
    resident memory seen (sampled every 20 ms): what the command needs beyond clean file pages."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    out, err = (tmp / f"fullsize-{os.getpid()}-{label}.{s}" for s in ("out", "err"))
    start = time.perf_counter()
    with out.open("w") as fo, err.open("w") as fe, (stdin or Path(os.devnull)).open() as fi:
        p = subprocess.Popen([str(c) for c in cmd], stdin=fi, stdout=fo, stderr=fe, cwd=ROOT)
        res = _wait(p, timeout)
    res.update(stdout=out.read_text(errors="replace"), stderr=err.read_text(errors="replace"),
               seconds=round(time.perf_counter() - start, 1))
    out.unlink()
    err.unlink()
    return res


class Anon:
    """Samples a child's anonymous resident memory every 20 ms in a thread (`with Anon(pid) as a: ...; a.peak`)."""

    def __init__(self, pid: int):
        import threading
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.02):
            try:
                with open(f"/proc/{self.pid}/status") as fh:
                    now = next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("RssAnon:")), 0)
            except OSError:
                continue
            self.peak = max(self.peak, now)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _exited(p: subprocess.Popen) -> bool:
    """Whether p has ended, without reaping it (its rusage is read when it is reaped)."""
    return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait(p: subprocess.Popen, timeout: float) -> dict:
    """Wait for p (killed after `timeout` s: rc 124), sampling its anonymous memory; rc and peaks."""
    deadline = time.monotonic() + timeout
    with Anon(p.pid) as anon:
        while True:
            pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                p.kill()
                _, status, rusage = os.wait4(p.pid, 0)
                p.returncode = 124
                break
            time.sleep(0.1)
    return {"rc": p.returncode, "peak_rss": rusage.ru_maxrss * 1024, "peak_anon": anon.peak}


def _mem(r: dict) -> dict:
    return {k: r[k] for k in ("rc", "seconds", "peak_rss", "peak_anon")}


def phitune(*args, label: str, **kw) -> dict:
    r = run([sys.executable, "-m", "phitune", *args], label, **kw)
    if r["rc"] != 0:
        print(f"fullsize: phitune {args[0]} exited {r['rc']}:\n{r['stderr'][-3000:]}", file=sys.stderr, flush=True)
    return r


def _num(pattern: str, text: str) -> float | None:
    import re
    m = re.search(pattern, text)
    if not m:
        return None
    value, unit = float(m.group(1)), (m.group(2) if m.lastindex and m.lastindex > 1 else "")
    return value * {"GiB": GIB, "MiB": 2 ** 20}.get(unit, 1)


# ---------------------------------------------------------------- the steps

def room(need: float, force: bool) -> str | None:
    """None when `need` bytes fit in 95% of the memory available now (or force); else why the step is skipped."""
    import psutil
    available = psutil.virtual_memory().available
    if force or need <= 0.95 * available:
        return None
    return f"skipped: needs ~{need / GIB:.1f} GiB, {available / GIB:.1f} GiB available (--force runs it anyway)"


def params(model: Path) -> int:
    from phitune.hardware import memory
    from phitune.models import loading
    return memory.model_shape(loading.load_config(str(model))).params


def step_plan(cfg_dir: Path, work: Path, shapes=SHAPES, force: bool = False) -> list:
    """plan --measure at each shape on the config-only directory, with the train pre-flight's estimate."""
    rows = []
    for batch, tokens in shapes:
        skip = room(preflight_estimate(cfg_dir, batch, tokens), force)
        if skip:
            rows.append({"batch": batch, "tokens": tokens, "skipped": skip})
            continue
        data = dataset(cfg_dir, tokens, 4 * batch, work / f"data-{tokens}.jsonl")
        r = phitune("plan", "--model", cfg_dir, "--dataset_path", data, "--batch_size", batch, "--max_length",
                    tokens, "--val_split", 0, "--gradient_checkpointing", "false", "--measure",
                    label=f"plan-{batch}x{tokens}")
        text = r["stdout"]
        row = {"batch": batch, "tokens": tokens, "rc": r["rc"], "process_peak_rss": r["peak_rss"],
               "process_peak_anon": r["peak_anon"],
               "seconds": r["seconds"],
               "measured_peak": _num(r"peak ([\d.]+) (GiB|MiB) vs", text),
               "estimated_peak": _num(r"vs estimated ([\d.]+) (GiB|MiB)", text),
               "measured_step_s": _num(r"step ([\d.]+) s vs", text),
               "estimated_step_s": _num(r"step [\d.]+ s vs estimated ([\d.]+) s", text),
               "matmul_gflops": _num(r"matmul ([\d,.]+) GFLOP/s", text.replace(",", "")),
               "preflight_estimate": preflight_estimate(cfg_dir, batch, tokens),
               "precision": next((ln.strip() for ln in text.splitlines() if "precision:" in ln), None)}
        if row["measured_peak"]:
            row["error"] = round(row["estimated_peak"] / row["measured_peak"] - 1, 3)
            row["preflight_error"] = round(row["preflight_estimate"] / row["measured_peak"] - 1, 3)
        rows.append(row)
    return rows


def preflight_estimate(model: Path, batch: int, tokens: int) -> int:
    """The estimate `phitune train`'s pre-flight makes for this run (training's defaults, CPU or GPU here)."""
    from phitune.config import LoraArgs
    from phitune.hardware import memory
    from phitune.models import loading
    config = loading.load_config(str(model))
    device = loading.pick_device()
    weights, compute = loading.precision_plan(device, "auto", config.model_type)
    return memory.train_estimate(config, LoraArgs(), batch, tokens, False, weights, compute, device).total_bytes


def step_train(built: Path, cfg_dir: Path, work: Path) -> dict:
    batch, tokens = SHAPES[0]
    data = dataset(cfg_dir, tokens, 4 * batch, work / f"data-{tokens}.jsonl")
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    r = phitune("train", "--model", built, "--dataset_path", data, "--output_dir", out, "--max_steps", 2,
                "--batch_size", batch, "--max_length", tokens, "--val_split", 0, "--gradient_checkpointing",
                "false", label="train")
    header = next((ln.strip() for ln in r["stderr"].splitlines() if ln.startswith("model: ")), None)
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    est = preflight_estimate(built, batch, tokens)
    secs = [m["seconds"] for m in metrics if "loss" in m]
    return {**_mem(r), "batch": batch, "tokens": tokens,
            "preflight_estimate": est, "preflight_error": round(est / r["peak_anon"] - 1, 3) if r["rc"] == 0 else None,
            "header": header, "adapter": str(out / "final_adapter"),
            "adapter_written": (out / "final_adapter" / "adapter_model.safetensors").is_file(),
            "step_s": [round(b - a, 1) for a, b in zip([0] + secs, secs)],
            "losses": [m["loss"] for m in metrics if "loss" in m]}


def step_merge(adapter: str, work: Path) -> dict:
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    r = phitune("merge", "--adapter_path", adapter, "--output_dir", out, "--dtype", "bfloat16", label="merge")
    check = next((ln for ln in r["stdout"].splitlines() if ln.startswith("check:")), None)
    shutil.rmtree(out, ignore_errors=True)
    return {**_mem(r), "check": check, "dtype": "bfloat16"}


def step_chat(adapter: str) -> dict:
    r = phitune("chat", "--adapter_path", adapter, "--prompt", PROMPTS[1], "--max_new_tokens", 16, label="chat")
    return {**_mem(r), "answer": r["stdout"].strip()[:200]}


def step_compare(adapter: str, work: Path) -> dict:
    q = work / "questions.yaml"
    q.write_text("questions:\n" + "".join(f"  - {json.dumps(p)}\n" for p in PROMPTS[:2]))
    r = phitune("compare", "--adapter_path", adapter, "--questions", q, "--max_new_tokens", 16, "--no_color",
                label="compare")
    return {**_mem(r), "questions": 2,
            "output_lines": len(r["stdout"].splitlines())}


def step_serve(adapter: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errf = Path(os.environ.get("TMPDIR", "/tmp")) / f"fullsize-{os.getpid()}-serve.err"
    start = time.perf_counter()
    with errf.open("w") as fe:
        p = subprocess.Popen([sys.executable, "-m", "phitune", "serve", "--adapter_path", adapter, "--port",
                              str(port)], stdout=fe, stderr=fe, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        answer, ready_s, request_s, error = None, None, None, None
        with Anon(p.pid) as anon:
            try:
                while ready_s is None:
                    if _exited(p):
                        raise RuntimeError("serve exited before it answered")
                    try:
                        models = json.load(urllib.request.urlopen(base + "/v1/models", timeout=2))["data"]
                        ready_s = time.perf_counter() - start
                    except OSError:
                        time.sleep(1)
                name = next(m["id"] for m in models if m["id"] != "base")
                body = json.dumps({"model": name, "max_tokens": 16, "temperature": 0,
                                   "messages": [{"role": "user", "content": PROMPTS[1]}]}).encode()
                req = urllib.request.Request(base + "/v1/chat/completions", body,
                                             {"Content-Type": "application/json"})
                t = time.perf_counter()
                answer = json.load(urllib.request.urlopen(req, timeout=600))
                request_s = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - recorded in the report
                error = repr(e)
            finally:
                if not _exited(p):
                    p.send_signal(signal.SIGINT)
        waited = _wait(p, 60)
    log = errf.read_text(errors="replace")
    errf.unlink()
    if error:
        print(f"fullsize: serve: {error}\n{log[-3000:]}", file=sys.stderr)
    return {"rc": waited["rc"], "ok": answer is not None, "error": error, "ready_s": round(ready_s or 0, 1),
            "request_s": round(request_s, 2) if request_s else None, "peak_rss": waited["peak_rss"],
            "peak_anon": max(waited["peak_anon"], anon.peak), "usage": (answer or {}).get("usage")}


def step_export(adapter: str, work: Path) -> dict:
    res, files = {}, {}
    for outtype in ("f16", "q8_0"):
        files[outtype] = work / f"model-{outtype}.gguf"
        r = phitune("export", "--adapter_path", adapter, "--output", files[outtype], "--outtype", outtype,
                    label=f"export-{outtype}")
        res[outtype] = {"rc": r["rc"], "seconds": r["seconds"], "peak_rss": r["peak_rss"], "peak_anon": r["peak_anon"],
                        "size": files[outtype].stat().st_size if files[outtype].is_file() else None}
    ref = work / "reference"
    r = run([sys.executable, __file__, "--reference", adapter, "--work", ref], "reference")
    res["reference"] = _mem(r)
    if r["rc"] != 0:
        print(f"fullsize: reference failed:\n{r['stderr'][-3000:]}", file=sys.stderr)
        return res
    want = json.loads((ref / "reference.json").read_text())
    for outtype, variant in (("f16", "f16"), ("q8_0", "f32")):
        if res[outtype]["rc"] == 0:
            res[outtype].update(compare_llamacpp(files[outtype], want[variant], ref / variant))
            files[outtype].unlink()
    return res


def compare_llamacpp(gguf: Path, want: dict, arrays: Path) -> dict:
    """llama.cpp on `gguf` against the transformers reference (greedy ids, log-softmax along each sequence)."""
    import numpy as np
    request = {"model": str(gguf), "context": 512, "threads": os.cpu_count(), "top": 20,
               "generate": [{"ids": w["prompt"], "max_tokens": N_GREEDY} for w in want["prompts"]],
               "probs": [w["prompt"] + w["greedy"] for w in want["prompts"]]}
    r = _node(request, gguf.stem)
    if "error" in r:
        return r
    got = r["answer"]
    greedy_equal, agree, total, max_diff, margins = [], 0, 0, 0.0, []
    for i, (w, gen, probs) in enumerate(zip(want["prompts"], got["generated"], got["probs"])):
        hf = [t for t in w["greedy"] if t not in want["stops"]]
        greedy_equal.append(gen["ids"][:N_GREEDY] == hf[:N_GREEDY])
        logp = np.load(arrays / f"prompt{i}.npy")  # (positions, vocab) float32 log-softmax
        for pos, top in enumerate(probs):
            if not top:
                continue
            order = np.argsort(logp[pos])[::-1][:2]
            total += 1
            if top[0][0] == int(order[0]):
                agree += 1
            else:
                margins.append(float(logp[pos, order[0]] - logp[pos, order[1]]))
            for tok, prob in top:
                if prob > 0:
                    max_diff = max(max_diff, abs(float(np.log(prob)) - float(logp[pos, tok])))
    return {"greedy_equal": f"{sum(greedy_equal)}/{len(greedy_equal)}", "greedy_each": greedy_equal,
            "top1_agreement": round(agree / max(total, 1), 4), "positions": total,
            "max_abs_logprob_diff": round(max_diff, 4), "disagreeing_margins": [round(m, 4) for m in margins],
            "llamacpp_peak_rss": r["peak_rss"], "llamacpp_seconds": r["seconds"]}


def _node(request: dict, label: str) -> dict:
    req = Path(os.environ.get("TMPDIR", "/tmp")) / f"fullsize-{os.getpid()}-request.json"
    req.write_text(json.dumps(request))
    r = run(["node", ROOT / "tools" / "llamacpp" / "run.mjs"], f"llamacpp-{label}", timeout=3600, stdin=req)
    req.unlink()
    if r["rc"] != 0:
        return {"error": r["stderr"][-2000:]}
    return {"answer": json.loads(r["stdout"]), **_mem(r)}


def reference(adapter: str, work: Path) -> None:
    """(child) The merged transformers model, in float32 and rounded to f16 as the f16 file stores it:
    greedy continuations and the log-softmax along prompt + continuation, written under `work`."""
    import numpy as np
    import torch

    from phitune.exporting.merge import merge_adapter
    merged, tok, template, _, _, _ = merge_adapter(adapter)
    merged.eval()
    stops = template.stop_token_ids() or [tok.eos_token_id]  # Phi-2: <|endoftext|> is also its unk token
    ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    result = {"stops": stops}
    for variant in ("f32", "f16"):
        if variant == "f16":  # matrices as the f16 file stores them; 1-D tensors stay float32 there too
            with torch.no_grad():
                for p in merged.parameters():
                    if p.ndim >= 2:
                        p.copy_(p.to(torch.float16).to(torch.float32))
        (work / variant).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, prompt in enumerate(ids):
            with torch.no_grad():
                g = merged.generate(torch.tensor([prompt]), max_new_tokens=N_GREEDY, do_sample=False,
                                    eos_token_id=stops, pad_token_id=stops[0])[0, len(prompt):].tolist()
                logp = merged(torch.tensor([prompt + g])).logits[0].float().log_softmax(-1)
            np.save(work / variant / f"prompt{i}.npy", logp.numpy())
            rows.append({"prompt": prompt, "greedy": g})
        result[variant] = {"prompts": rows, "stops": stops}
    (work / "reference.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- report

def cpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")),
                platform.processor())
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").is_file() else ""
    import psutil
    return {"model": name, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags, "ram_gib": round(psutil.virtual_memory().total / GIB, 1)}


def gib(n) -> str:
    return f"{n / GIB:.2f}" if n else "-"


def markdown(report: dict) -> str:
    """The report as markdown: plan estimates vs measured, each command's memory, llama.cpp agreement."""
    c = report["cpu"]
    lines = [f"CPU: {c['model']}, {c['cores']} cores, {c['ram_gib']} GiB, avx512_bf16 {c['avx512_bf16']}, "
             f"amx {c['amx']}; decoder layers: {report['layers'] or 'all (full size)'}", "",
             "| model | batch x tokens | plan estimate GiB | pre-flight GiB | measured GiB | error | step s "
             "(estimated / measured) |", "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for p in m.get("plan", []):
            if "skipped" in p:
                lines.append(f"| {name} | {p['batch']} x {p['tokens']} | {p['skipped']} | | | | |")
                continue
            err = f"{p['error']:+.0%}" if "error" in p else f"exit {p['rc']}"
            lines.append(f"| {name} | {p['batch']} x {p['tokens']} | {gib(p['estimated_peak'])} | "
                         f"{gib(p['preflight_estimate'])} | {gib(p['measured_peak'])} | {err} | "
                         f"{p['estimated_step_s']} / {p['measured_step_s']} |")
    lines += ["", "| model | command | peak RSS GiB | peak anonymous GiB | seconds | result |",
              "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        t = m.get("train")
        if t and "skipped" in t:
            lines.append(f"| {name} | train and the rest | {t['skipped']} | | | |")
        elif t:
            lines.append(f"| {name} | train, 2 steps of {t['batch']} x {t['tokens']} | {gib(t['peak_rss'])} | "
                         f"{gib(t['peak_anon'])} (pre-flight {gib(t['preflight_estimate'])}) | {t['seconds']} | "
                         f"steps {t['step_s']} s; {(t['header'] or '').split(' on ', 1)[-1].split(', compute')[0]} |")
        for cmd in ("merge", "chat", "compare", "serve", "export"):
            for outtype, r in ({"": m[cmd]} if cmd != "export" else m.get(cmd, {})).items() if cmd in m else ():
                if outtype == "reference":
                    continue
                if "skipped" in r:
                    lines.append(f"| {name} | {cmd} | {r['skipped']} | | | |")
                    continue
                what = {"merge": "merged vs base+adapter logits: max diff " +
                        (r.get("check") or "= -").split("= ")[1].split(" ")[0], "chat": repr(r.get("answer", "")[:40]),
                        "compare": f"{r.get('questions')} questions x (base, adapter)",
                        "serve": f"ready {r.get('ready_s')} s, one request {r.get('request_s')} s"
                        if r.get("ok") else r.get("error"),
                        "export": f"{gib(r.get('size'))} GiB file"}[cmd].replace("|", "\\|")
                lines.append(f"| {name} | {cmd} {outtype} | {gib(r['peak_rss'])} | {gib(r['peak_anon'])} | "
                             f"{r.get('seconds', r.get('ready_s'))} | {what} |")
    lines += ["", "| model | GGUF | greedy 16 tokens equal | top-1 agreement | max abs log-prob diff | transformers "
              "top-1/top-2 margin where they disagree |", "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for outtype in ("f16", "q8_0"):
            e = m.get("export", {}).get(outtype)
            if e and "top1_agreement" in e:
                lines.append(f"| {name} | {outtype} | {e['greedy_equal']} | {e['top1_agreement']:.1%} of "
                             f"{e['positions']} | {e['max_abs_logprob_diff']} | "
                             f"{', '.join(map(str, e['disagreeing_margins'])) or '-'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", type=int, help="shrink the configs to N decoder layers (development)")
    ap.add_argument("--only", default=",".join(STEPS))
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="plan --measure shapes")
    ap.add_argument("--output", default=str(ROOT / "bench" / "fullsize.json"))
    ap.add_argument("--force", action="store_true", help="run steps even when the memory available looks short")
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference:
        reference(args.reference, Path(args.work))
        return 0
    steps = args.only.split(",")
    report = {"cpu": cpu(), "layers": args.layers, "seed": SEED, "models": {}}
    if args.layers and args.output == ap.get_default("output"):  # development figures stay out of bench/
        args.output = str(cache() / f"fullsize.L{args.layers}.json")
    for name in args.models.split(","):
        cfg_dir = config_dir(name, args.layers)
        work = cfg_dir.parent / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        m = report["models"][name] = {}
        if "plan" in steps:
            shapes = [tuple(map(int, x.split("x"))) for x in args.shapes.split(",")]
            m["plan"] = step_plan(cfg_dir, work, shapes, args.force)
        n = params(cfg_dir)
        if set(steps) - {"plan"} and not room(n * NEED["train"] + 0.5 * GIB, args.force):
            built = model_dir(name, args.layers)
            m["train"] = step_train(built, cfg_dir, work)
            adapter = m["train"]["adapter"]
            for step in ("merge", "chat", "compare", "serve", "export"):
                if step in steps and m["train"]["adapter_written"]:
                    skip = room(n * NEED[step] + 0.5 * GIB, args.force)
                    fn = globals()[f"step_{step}"]
                    m[step] = {"skipped": skip} if skip else \
                        fn(adapter, work) if step in ("merge", "compare", "export") else fn(adapter)
                    print(f"fullsize: {name} {step} {skip or 'done'}", flush=True)
        elif set(steps) - {"plan"}:
            m["train"] = {"skipped": room(n * NEED["train"] + 0.5 * GIB, args.force)}
        shutil.rmtree(work, ignore_errors=True)
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
