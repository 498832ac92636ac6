"""`phitune compare`: base model and adapters answer the same questions, side by side.

One copy of the base model is in memory, with every adapter beside it: base rows get no LoRA update at
all (an exact zero in rows.py), so their answers come from the untouched base weights, not from the tuned
model (tests/test_engine.py compares them with a freshly loaded base).
"""
import argparse
import json
import resource
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from phitune.config import add_arguments, settings
from phitune.config_commands import CompareArgs, Models, SamplingArgs
from phitune.errors import PhituneError
from phitune.generation import load as gen

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")
COLOURS = ("\033[36m", "\033[33m", "\033[32m", "\033[35m", "\033[34m")
RESET, DIM, BOLD = "\033[0m", "\033[2m", "\033[1m"


GROUPS = {"model": Models, "compare": CompareArgs, "sampling": SamplingArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    add_arguments(p, GROUPS)


def read_questions(path: str) -> list:
    """Questions YAML: the seed's `questions: [string, ...]`, or mappings with prompt/expected/sampling."""
    p = Path(path)
    if not p.is_file():
        raise PhituneError(f"{path}: questions file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PhituneError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or "questions" not in doc:
        raise PhituneError(f"{path}: expected a top-level 'questions:' list")
    items = doc["questions"]
    if not isinstance(items, list) or not items:
        raise PhituneError(f"{path}: 'questions' must be a non-empty list, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str) and item.strip():
            out.append({"prompt": item})
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"].strip():
            unknown = set(item) - {"prompt", "expected", *SAMPLING_KEYS}
            if unknown:
                raise PhituneError(f"{path}: question {i}: unknown key(s) {sorted(unknown)}; allowed: prompt, "
                                   f"expected, {', '.join(SAMPLING_KEYS)}")
            out.append(item)
        else:
            raise PhituneError(f"{path}: question {i} must be a non-empty string or a mapping with 'prompt'")
    return out


def main(args: argparse.Namespace) -> int:
    args = settings(args, GROUPS)
    sampling = args.parts["sampling"].sampling()
    questions = read_questions(args.questions) if args.questions else None
    if args.web and questions:
        raise PhituneError("--web shows the page for your own questions; drop --questions (or --web)")
    loaded = gen.load(args.adapter_path, args.model, args.system_prompt, args.trust_remote_code, args.precision)
    if args.web:
        return _web(loaded, args.port, args.allowed_hosts)
    columns = [None] + list(loaded.adapters)  # None = base
    colour = sys.stdout.isatty() and not args.no_color
    print(f"{DIM if colour else ''}base: {loaded.base_name}; adapters: "
          f"{', '.join(loaded.adapters) or 'none'}; {_sampling_text(sampling)}{RESET if colour else ''}",
          file=sys.stderr)
    if questions is None:
        rows = _repl(loaded, columns, sampling, colour)
    else:
        rows = run_batch(loaded, questions, columns, sampling, args.batch_size)
        for row in rows:
            show(row, columns, colour)
    print(_memory_line(loaded), file=sys.stderr)
    if args.report and rows:
        write_report(args.report, rows, loaded, sampling)
        print(f"report written to {args.report}", file=sys.stderr)
    return 0


def _web(loaded, port, allowed_hosts=()):
    """The page of `phitune serve` for this base and these adapters, on localhost only."""
    import os
    import threading
    import webbrowser

    from phitune.serving.routes import build_app, server
    app = build_app(loaded, host="127.0.0.1", allowed_hosts=allowed_hosts)
    url = f"http://127.0.0.1:{port}/"
    print(f"phitune compare: base and {', '.join(loaded.adapters) or 'no adapter'} side by side at {url} "
          f"(Ctrl-C stops)", file=sys.stderr, flush=True)
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32"):
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    server(app, "127.0.0.1", port).run()
    return 0


def run_batch(loaded: gen.Loaded, questions: list, columns: list, sampling: gen.Sampling,
              batch_size: int = 16) -> list:
    """Answer all questions with every column; base and adapter rows share the same batches."""
    rows = [{"prompt": q["prompt"], "expected": q.get("expected"), "answers": {}} for q in questions]
    jobs, where = [], []
    for i, q in enumerate(questions):
        s = replace(sampling, **{k: q[k] for k in SAMPLING_KEYS if k in q})
        for col in columns:
            jobs.append(([{"role": "user", "content": q["prompt"]}], col, s))
            where.append((i, _label(col)))
    try:
        answers = gen.generate_jobs(loaded, jobs, batch_size=batch_size)
    except gen.ContextOverflow as e:
        i, label = where[e.index]
        raise PhituneError(f"question {i + 1} ({_short(questions[i]['prompt'])}) for {label}: {e}; shorten the "
                           f"question or lower max_new_tokens") from None
    for (i, label), answer in zip(where, answers):
        rows[i]["answers"][label] = answer
    return rows


def _short(text, n=40):
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def _repl(loaded, columns, sampling, colour):
    rows = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            prompt = input("question> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        if not prompt.strip():
            continue
        if prompt.strip() in ("/quit", "/exit"):
            break
        try:
            row = run_batch(loaded, [{"prompt": prompt}], columns, sampling)[0]
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        except PhituneError as e:  # e.g. a question too long for the model's context: the session goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        show(row, columns, colour)
        rows.append(row)
    return rows


def _label(col):
    return "base" if col is None else col


def show(row: dict, columns: list, colour: bool) -> None:
    """Side by side when the terminal is wide enough (and a terminal), stacked otherwise."""
    labels = [_label(c) for c in columns]
    width = shutil.get_terminal_size((100, 24)).columns
    c = (lambda i: COLOURS[i % len(COLOURS)]) if colour else (lambda i: "")
    r, b = (RESET, BOLD) if colour else ("", "")
    print(f"\n{b}Q: {row['prompt']}{r}")
    if row.get("expected"):
        print(f"expected: {row['expected']}")
    col_w = (width - 3 * (len(labels) - 1)) // len(labels)
    if colour and col_w >= 30:
        cells = []
        for lab in labels:
            a = row["answers"][lab]
            body = [f"{lab}  ({a.tokens} tok, {a.seconds:.1f}s)", "-" * min(col_w, 40)]
            for para in a.text.splitlines() or [""]:
                body += textwrap.wrap(para, col_w) or [""]
            cells.append(body)
        for line in range(max(len(x) for x in cells)):
            parts = [f"{c(i)}{(x[line] if line < len(x) else '').ljust(col_w)}{r}" for i, x in enumerate(cells)]
            print(" | ".join(parts))
    else:
        for i, lab in enumerate(labels):
            a = row["answers"][lab]
            print(f"{c(i)}[{lab}] ({a.tokens} tokens, {a.seconds:.1f}s){r}\n{a.text}")


def _sampling_text(s):
    if not s.temperature:
        return f"greedy, max {s.max_new_tokens} tokens"
    return f"temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, seed {s.seed}"


def peak_memory_mib(device: object = None) -> float:
    import torch
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _memory_line(loaded):
    import torch
    tensors = list(loaded.model.parameters()) + [t for m in loaded.model.modules()  # packed and int8 weights
                                                  for t in (getattr(m, "packed", None), getattr(m, "qweight", None))
                                                  if isinstance(t, torch.Tensor)]
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()) / 2**20
    return f"memory: peak {peak_memory_mib(loaded.device):.0f} MiB; model weights {weights:.0f} MiB (one base copy)"


def write_report(path: str, rows: list, loaded: gen.Loaded, sampling: gen.Sampling) -> None:
    path = Path(path)
    labels = ["base"] + list(loaded.adapters)
    settings = {"base_model": loaded.base_name, "sampling": asdict(sampling),
                "adapters": {n: {"path": p, "metrics": loaded.metas[n].get("metrics"),
                                 "template": (loaded.metas[n].get("template") or {}).get("kind")}
                             for n, p in loaded.adapters.items()},
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"settings": settings}) + "\n")
            for row in rows:
                fh.write(json.dumps({"prompt": row["prompt"], "expected": row.get("expected"),
                                     "answers": {k: asdict(v) for k, v in row["answers"].items()}}) + "\n")
    elif path.suffix in (".html", ".htm"):
        import html
        e = html.escape
        parts = ["<!doctype html><meta charset=utf-8><title>phitune compare</title>",
                 "<style>body{font-family:sans-serif}td,th{vertical-align:top;border:1px solid #ccc;padding:6px}"
                 "table{border-collapse:collapse}</style>",
                 f"<h1>phitune compare</h1><pre>{e(json.dumps(settings, indent=2, default=str))}</pre><table><tr>"
                 "<th>question</th><th>expected</th>" + "".join(f"<th>{e(lab)}</th>" for lab in labels) + "</tr>"]
        for row in rows:
            cells = "".join(f"<td>{e(row['answers'][lab].text)}<br><small>{row['answers'][lab].tokens} tokens, "
                            f"{row['answers'][lab].seconds:.1f}s</small></td>" for lab in labels)
            parts.append(f"<tr><td>{e(row['prompt'])}</td><td>{e(row.get('expected') or '')}</td>{cells}</tr>")
        path.write_text("".join(parts) + "</table>\n", encoding="utf-8")
    else:
        lines = ["# phitune compare", "", f"- base model: `{loaded.base_name}`",
                 f"- sampling: {_sampling_text(sampling)}"]
        for n, p in loaded.adapters.items():
            lines.append(f"- adapter `{n}`: `{p}` (metrics: {json.dumps(loaded.metas[n].get('metrics'))})")
        for i, row in enumerate(rows, 1):
            lines += ["", f"## {i}. {row['prompt']}", ""]
            if row.get("expected"):
                lines += [f"**expected:** {row['expected']}", ""]
            for lab in labels:
                a = row["answers"][lab]
                lines += [f"**{lab}** ({a.tokens} tokens, {a.seconds:.1f}s):", "", a.text.strip() or "_(empty)_", ""]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
