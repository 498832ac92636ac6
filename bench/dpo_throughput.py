"""Preference tuning speed and memory: `phitune train --method dpo` vs TRL's DPOTrainer at its defaults.

    make bench            # or: .venv/bin/python bench/dpo_throughput.py [--pairs 64] [--repeats 1]
                          #         [--only trl phitune-dpo phitune-sft]

The same DPO work for both: the demo model (SmolLM2-135M-Instruct), --pairs preference pairs from the
E2E dev set in TRL's conversational form (prompt: describe this MR; chosen: a human reference of it;
rejected: a reference of another MR), rendered by the model's chat template, LoRA r=16 / alpha 32 /
dropout 0.05 on all linear layers, batch 8 pairs, 1 epoch, max_length 1024, beta 0.1, learning rate 1e-6
(TRL's default). TRL runs at its defaults: `DPOConfig(output_dir, use_cpu=True)` is the only override a
CPU needs (bf16 autocast, gradient checkpointing on, the reference forward at every step), plus the
shared work settings above (its defaults already for batch, max_length, beta and learning rate). phitune
runs at its own defaults for everything else (precision auto, --gradient_checkpointing auto, reference
log-probs computed once before the first step).

Each system is one whole process, timed from start to exit by this script (model loading, tokenising and
the reference pass included); with --repeats N the figures are medians. Memory: the peak RSS of each
process; `phitune-sft` trains the chosen answers alone with the same batch size, so the DPO/SFT ratio is
the cost of the second answer per pair (target: at most 1.3x); `phitune-sft-rows` trains both answers as
examples at twice the batch size, the same rows a DPO step holds, so that ratio is DPO's own overhead.
Writes bench/dpo_throughput.json and prints a markdown table. Needs requirements-bench.txt (TRL) installed.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DATA, MODEL, PathsTaken, cpu_kind, rss_peak_mib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(r=16, alpha=32, dropout=0.05)
BATCH, EPOCHS, MAX_LENGTH, BETA, LR = 8, 1, 1024, 0.1, 1e-6
PROMPT = "Write one sentence describing this restaurant: {mr}"
SYSTEMS = ("trl", "phitune-dpo", "phitune-sft", "phitune-sft-rows")


def make_pairs(n: int) -> list[dict]:
    """n conversational pairs: a reference of the MR is chosen, a reference of the next MR rejected."""
    import csv
    by_mr: dict[str, list[str]] = {}
    with open(DATA, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_mr.setdefault(row["mr"], []).append(row["ref"])
    mrs = list(by_mr)
    out = []
    for i in range(n):
        mr, other = mrs[i % len(mrs)], mrs[(i + 1) % len(mrs)]
        refs = by_mr[mr]
        chosen = refs[(i // len(mrs)) % len(refs)]
        # two MRs can share a reference text; a pair needs two different answers (phitune refuses the same)
        rejected = next(r for r in by_mr[other] + [chosen + " Nothing else is known."] if r != chosen)
        out.append({"prompt": [{"role": "user", "content": PROMPT.format(mr=mr)}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


# ------------------------------------------------------------------ the systems, each in its own process

def run_trl(pairs: list[dict]) -> dict:
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from phitune.models import loading as models
    path = str(models.provision_demo())
    out_dir = tempfile.mkdtemp(prefix="bench-trl-dpo-")
    args = DPOConfig(output_dir=out_dir, use_cpu=True,  # the CPU override
                     num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     beta=BETA, learning_rate=LR, disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=path, args=args, processing_class=AutoTokenizer.from_pretrained(path),
                         train_dataset=Dataset.from_list(pairs), peft_config=lora)
    start = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"train_seconds": train_s, "steps": trainer.state.global_step, "final_loss": out.training_loss,
            "settings": {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                         "precompute_ref_log_probs": args.precompute_ref_log_probs, "optim": str(args.optim)}}


def run_phitune(pairs: list[dict], method: str) -> dict:
    from phitune.cli import main
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-phitune-{method}-"))
    data = tmp / "data.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for p in pairs:
            if method == "dpo":
                rows = [p]
            elif method == "sft":
                rows = [{"messages": p["prompt"] + p["chosen"]}]
            else:  # sft-rows: both answers as examples, the rows a DPO batch holds
                rows = [{"messages": p["prompt"] + p[k]} for k in ("chosen", "rejected")]
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    argv = ["train", "--model", MODEL, "--dataset_path", str(data), "--output_dir", str(tmp / "run"),
            "--epochs", str(EPOCHS), "--batch_size", str(2 * BATCH if method == "sft-rows" else BATCH),
            "--gradient_accumulation_steps", "1",
            "--max_length", str(MAX_LENGTH), "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
            "--lora_dropout", str(LORA["dropout"]), "--learning_rate", str(LR), "--val_split", "0"]
    if method == "dpo":
        argv += ["--method", "dpo", "--beta", str(BETA)]
    try:
        main(argv)
    except SystemExit as e:
        if e.code:
            raise
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "step" in r]
    shutil.rmtree(tmp, ignore_errors=True)
    return {"train_seconds": steps[-1].get("seconds") if steps else None, "steps": len(steps),
            "final_loss": steps[-1]["loss"] if steps else None,
            "last_metrics": {k: v for k, v in (steps[-1] if steps else {}).items()
                             if k in ("rewards/chosen", "rewards/rejected", "margin", "accuracy")}}


def child(system: str, n_pairs: int) -> None:
    pairs = make_pairs(n_pairs)
    with PathsTaken() as seen:
        result = run_trl(pairs) if system == "trl" else run_phitune(pairs, system.split("-", 1)[1])
    result["peak_rss_mib"] = rss_peak_mib()
    result["paths"] = seen.paths
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------ the run and the table

def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64, help="preference pairs (steps = pairs / 8)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each system; the table shows medians")
    ap.add_argument("--only", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the children (with TRL installed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(ROOT / "bench" / "dpo_throughput.json"))
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.pairs)
    cpu = cpu_kind()
    print(f"CPU: {cpu['name']}, {cpu['cpus']} CPUs, flags {' '.join(cpu['flags']) or '-'}: {cpu['kind']}",
          file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in args.only}
    for rep in range(args.repeats):
        for system in args.only:  # interleaved, so a busy minute does not fall on one system only
            print(f"--- {system} (run {rep + 1} of {args.repeats})", file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run([args.python, __file__, "--child", system, "--pairs", str(args.pairs)],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                runs[system].append({"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
                continue
            result = json.loads(line[len("RESULT "):])
            result["process_seconds"] = wall
            runs[system].append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    summary = {}
    for system, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            summary[system] = {"error": rs[-1]["error"] if rs else "not run"}
            continue
        summary[system] = {k: median_of(ok, k) for k in ("process_seconds", "train_seconds", "peak_rss_mib",
                                                          "final_loss", "steps")}
        summary[system]["paths"] = ok[-1].get("paths")
        summary[system]["runs"] = len(ok)
    names = {"trl": "TRL `DPOTrainer`, defaults (+ use_cpu)", "phitune-dpo": "phitune `train --method dpo`",
             "phitune-sft": f"phitune `train` (SFT, chosen answers, batch {BATCH})",
             "phitune-sft-rows": f"phitune `train` (SFT, chosen and rejected answers, batch {2 * BATCH})"}
    med = " (median)" if args.repeats > 1 else ""
    lines = [f"| system | whole process s{med} | training s | peak RSS MiB | final loss | paths |",
             "|---|---|---|---|---|---|"]
    for system, s in summary.items():
        if "error" in s:
            lines.append(f"| {names[system]} | error: {s['error']} | | | | |")
            continue
        p = s.get("paths") or {}
        paths = (f"{p.get('compute')}, {p.get('attention')}, {p.get('fused_lora_layers')}/{p.get('lora_layers')} "
                 f"LoRA fused, checkpointing {'on' if p.get('gradient_checkpointing') else 'off'}") if p else "-"
        train = f"{s['train_seconds']:.1f}" if s.get("train_seconds") is not None else "-"
        loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
        lines.append(f"| {names[system]} | {s['process_seconds']:.1f} | {train} | {s['peak_rss_mib']:,.0f} | {loss} "
                     f"| {paths} |")
    ratios = {}
    ok = {k: v for k, v in summary.items() if "error" not in v}
    if "trl" in ok and "phitune-dpo" in ok:
        ratios["speedup_vs_trl"] = ok["trl"]["process_seconds"] / ok["phitune-dpo"]["process_seconds"]
        lines.append(f"\nphitune DPO vs TRL DPOTrainer, whole processes: **{ratios['speedup_vs_trl']:.2f}x** faster "
                     f"(target 2x)")
    if "phitune-dpo" in ok and "phitune-sft" in ok:
        ratios["dpo_over_sft_peak_rss"] = ok["phitune-dpo"]["peak_rss_mib"] / ok["phitune-sft"]["peak_rss_mib"]
        lines.append(f"peak RSS, DPO / SFT of the same batch ({BATCH} pairs vs {BATCH} chosen answers): "
                     f"**{ratios['dpo_over_sft_peak_rss']:.2f}x** (target at most 1.3x)")
    if "phitune-dpo" in ok and "phitune-sft-rows" in ok:
        ratios["dpo_over_sft_rows_peak_rss"] = (ok["phitune-dpo"]["peak_rss_mib"]
                                                / ok["phitune-sft-rows"]["peak_rss_mib"])
        lines.append(f"peak RSS, DPO / SFT of the same rows ({BATCH} pairs vs {2 * BATCH} answers): "
                     f"**{ratios['dpo_over_sft_rows_peak_rss']:.2f}x**")
    work = (f"{args.pairs} pairs, LoRA r{LORA['r']}/alpha {LORA['alpha']}/dropout {LORA['dropout']} all-linear, "
            f"batch {BATCH}, {EPOCHS} epoch, max_length {MAX_LENGTH}, beta {BETA}, lr {LR}")
    print(f"\nCPU: {cpu['name']}, {cpu['cpus']} CPUs, flags {' '.join(cpu['flags']) or '-'} ({cpu['kind']}); "
          f"{platform.machine()}\nwork: {work}\n")
    print("\n".join(lines))
    Path(args.output).write_text(json.dumps({"cpu": cpu, "work": work, "pairs": args.pairs, "repeats": args.repeats,
                                             "summary": summary, "ratios": ratios, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
