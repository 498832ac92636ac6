"""Two training set-ups of the demo model in one process, stepping in turn on the same batches.

    .venv/bin/python bench/ab_step.py --a lora=fused,attention=phitune --b lora=peft,attention=eager

On a shared machine whose speed drifts +-30% from minute to minute, separate runs cannot resolve a 10%
change; alternating steps in one process can: the median of the per-step ratios is the figure to quote.
Each side: lora = fused (phitune's CPU LoRA layer) | peft (PEFT's LoRA with phitune's dropout masks) |
peft-dropout (PEFT's LoRA as is); attention = phitune | eager | sdpa. LoRA r=16 on all linear layers,
dropout 0.05, bf16 autocast, batches of 16 of the first 512 E2E pairs in shuffled length groups.
"""
import argparse
import csv
import random
import time
from pathlib import Path

import torch

from phitune import adapters, data, models
from phitune.config import LoraArgs
from phitune.cpu_attention import use_cpu_attention
from phitune.cpu_lora import FastDropout, use_fused_lora
from phitune.loss import AnswerLoss
from phitune.templates import Template

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "devset.csv"


def setup(spec):
    opts = dict(lora="fused", attention="phitune")
    opts.update(kv.split("=", 1) for kv in spec.split(",") if kv)
    model = models.load_model("smollm2-135m-instruct", torch.float32)
    model.config.use_cache = False
    if opts["attention"] == "phitune":
        use_cpu_attention(model)
    else:
        model.set_attn_implementation(opts["attention"])
    peft_model, _ = adapters.attach_lora(model, LoraArgs(lora_r=16, lora_dropout=0.05), seed=0)
    if opts["lora"] == "fused":
        use_fused_lora(peft_model)
    elif opts["lora"] == "peft":
        for module in peft_model.modules():
            if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
                for name, drop in list(module.lora_dropout.items()):
                    module.lora_dropout[name] = FastDropout(drop.p)
    loss_model = AnswerLoss(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    return loss_model, optimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="lora=fused,attention=phitune")
    ap.add_argument("--b", default="lora=peft,attention=eager")
    ap.add_argument("--steps", type=int, default=12, help="steps per side; the first two are not timed")
    args = ap.parse_args()
    tok = models.load_tokenizer("smollm2-135m-instruct")
    with open(DATA, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:512]
    records = [{"messages": [{"role": "user", "content": r["mr"]}, {"role": "assistant", "content": r["ref"]}]}
               for r in rows]
    examples, _ = data.encode_records(records, Template(tok), 512)
    sides = {"a": setup(args.a), "b": setup(args.b)}
    batches = data.length_grouped_batches([len(e["input_ids"]) for e in examples], 16, 0, 0)
    random.Random(0).shuffle(batches)
    rates = {"a": [], "b": []}
    for i, b in enumerate(batches[:args.steps]):
        batch = data.collate([examples[j] for j in b], tok.pad_token_id)
        tokens = int(batch["attention_mask"].sum())
        for side, (loss_model, optimizer) in sides.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, count = loss_model(**batch)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= 2:
                rates[side].append(tokens / (time.perf_counter() - start))
    med = lambda xs: sorted(xs)[len(xs) // 2]
    ratios = [a / b for a, b in zip(rates["a"], rates["b"])]
    print(f"a ({args.a}): median {med(rates['a']):.0f} tokens/s\nb ({args.b}): median {med(rates['b']):.0f} "
          f"tokens/s\na / b per step: median {med(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
