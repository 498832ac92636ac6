"""Profile LoRA training steps on the demo model (the measurements behind docs/benchmarks.md).

    .venv/bin/python bench/profile_step.py [--precision bf16|fp32] [--weights fp32|bf16]
                                           [--attention phitune|eager|sdpa] [--lora fused|peft|peft-dropout]
                                           [--compile] [--profile]

Batches of 16 of the first 512 E2E pairs (length-grouped), LoRA r=16 on all linear layers, dropout 0.05,
bf16 autocast (--precision fp32: fp32 compute without autocast, as phitune trains on CPUs without native
bf16; attention then eager or sdpa, phitune's attention being bf16). Prints the median tokens/s over
6 steps and the peak RSS; --profile adds a torch.profiler table of two more steps. --lora: phitune's
fused CPU layer, PEFT's layer with phitune's dropout masks, or PEFT's layer as is. bench/ab_step.py
builds its two set-ups with the same functions.
"""
import argparse
import csv
import os
import resource
import time
from pathlib import Path

import torch

from phitune.config import LoraArgs
from phitune.data import records as data
from phitune.data.templates import Template
from phitune.hardware.cpu_attention import use_cpu_attention
from phitune.hardware.cpu_lora import use_fused_lora
from phitune.models import adapters
from phitune.models import loading as models
from phitune.training.loss import AnswerLoss

# The E2E dev set sits in shared/ beside the checkout (or beside the folder of worktrees); E2E_CSV overrides.
DATA = Path(os.environ.get("E2E_CSV") or next(
    (p / "shared" / "data" / "e2e" / "devset.csv" for p in Path(__file__).resolve().parents[1:]
     if (p / "shared" / "data" / "e2e" / "devset.csv").is_file()), "../shared/data/e2e/devset.csv"))
MODEL = "smollm2-135m-instruct"


def e2e_examples(tokenizer, n=512):
    with open(DATA, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    records = [{"messages": [{"role": "user", "content": r["mr"]}, {"role": "assistant", "content": r["ref"]}]}
               for r in rows]
    return data.encode_records(records, Template(tokenizer), 512)[0]


def build(lora="fused", attention="phitune", weights="fp32", precision="bf16"):
    """(loss model, optimizer, autocast dtype or None) for the demo model with the given LoRA layer,
    attention and compute precision."""
    if precision == "fp32" and (attention == "phitune" or weights == "bf16"):
        raise SystemExit("--precision fp32 computes in fp32: use --attention eager or sdpa and fp32 weights")
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    model = models.load_model(MODEL, torch.bfloat16 if weights == "bf16" else torch.float32)
    model.config.use_cache = False
    if attention == "phitune":
        use_cpu_attention(model)
    else:
        model.set_attn_implementation(attention)
    peft_model, _ = adapters.attach_lora(model, LoraArgs(lora_r=16, lora_dropout=0.05), seed=0)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if lora != "peft-dropout":
        use_fused_lora(peft_model, compute if lora == "fused" else None)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    return AnswerLoss(peft_model), optimizer, (torch.bfloat16 if precision == "bf16" else None)


def train_step(setup, batch):
    """One optimizer step of a build() set-up (under its autocast, if any); returns the tokens trained on."""
    loss_model, optimizer, autocast = setup
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss, n = loss_model(**batch)
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad()
    return int(batch["attention_mask"].sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="compute precision")
    ap.add_argument("--weights", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--attention", default="phitune", choices=("sdpa", "eager", "phitune"))
    ap.add_argument("--lora", default="fused", choices=("fused", "peft", "peft-dropout"))
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of each decoder block")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    tok = models.load_tokenizer(MODEL)
    examples = e2e_examples(tok)
    setup = build(args.lora, args.attention, args.weights, args.precision)
    loss_model = setup[0]
    if args.compile:
        for layer in loss_model.decoder.layers:
            layer.compile(dynamic=True)
    batches = data.length_grouped_batches([len(e["input_ids"]) for e in examples], 16, 0, 0)

    def step(b):
        return train_step(setup, data.collate([examples[i] for i in b], tok.pad_token_id))

    for b in batches[:3]:  # warm-up (and compilation)
        step(b)
    rates, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for b in batches[3:9]:
        t = time.perf_counter()
        n = step(b)
        rates.append(n / (time.perf_counter() - t))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 6
    print(f"{vars(args)}: median {sorted(rates)[len(rates) // 2]:.0f} tokens/s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, {faults:.0f} page faults per step")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[9:11]:
                step(b)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
