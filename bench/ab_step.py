"""Two training set-ups of the demo model in one process, stepping in turn on the same batches.

    .venv/bin/python bench/ab_step.py --a lora=fused,attention=phitune --b lora=peft,attention=eager
    .venv/bin/python bench/ab_step.py --a lora=fused,attention=eager,precision=fp32 \
                                      --b lora=peft,attention=eager,precision=fp32

On a shared machine whose speed drifts +-30% from minute to minute, separate runs cannot resolve a 10%
change; alternating steps in one process can: the median of the per-step ratios is the figure to quote.
The CPU time of each step (this process's, all threads) is reported too: when other jobs take cores from
it, wall-clock ratios scatter, CPU-time ratios much less (with OMP_NUM_THREADS=1 no thread waits on another).
Each side: lora = fused (phitune's CPU LoRA layer) | peft (PEFT's LoRA with phitune's dropout masks) |
peft-dropout (PEFT's LoRA as is); attention = phitune | eager | sdpa; precision = bf16 (autocast, the
default) | fp32 (no autocast, as on CPUs without native bf16). LoRA r=16 on all linear layers,
dropout 0.05, batches of 16 of the first 512 E2E pairs in shuffled length groups.
"""
import argparse
import random
import sys
import time

from phitune.data import records as data
from phitune.models import loading as models
from profile_step import MODEL, build, e2e_examples, train_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="lora=fused,attention=phitune")
    ap.add_argument("--b", default="lora=peft,attention=eager")
    ap.add_argument("--steps", type=int, default=12, help="steps per side; the first two are not timed")
    args = ap.parse_args()
    tok = models.load_tokenizer(MODEL)
    examples = e2e_examples(tok)
    sides = {side: build(**dict(kv.split("=", 1) for kv in spec.split(",") if kv))
             for side, spec in (("a", args.a), ("b", args.b))}
    batches = data.length_grouped_batches([len(e["input_ids"]) for e in examples], 16, 0, 0)
    random.Random(0).shuffle(batches)
    rates, cpu = {"a": [], "b": []}, {"a": [], "b": []}
    for i, b in enumerate(batches[:args.steps]):
        batch = data.collate([examples[j] for j in b], tok.pad_token_id)
        for side in ("a", "b") if i % 2 == 0 else ("b", "a"):  # neither side always runs first
            setup = sides[side]
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = train_step(setup, batch)
            if i >= 2:
                rates[side].append(tokens / (time.perf_counter() - start))
                cpu[side].append(tokens / (time.process_time() - start_cpu))
        if i >= 2:
            print(f"step {i}: a {rates['a'][-1]:.0f}, b {rates['b'][-1]:.0f} tokens/s; per CPU second a "
                  f"{cpu['a'][-1]:.0f}, b {cpu['b'][-1]:.0f}", file=sys.stderr, flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    ratios = [a / b for a, b in zip(rates["a"], rates["b"])]
    cpu_ratios = [a / b for a, b in zip(cpu["a"], cpu["b"])]
    print(f"a ({args.a}): median {med(rates['a']):.0f} tokens/s, {med(cpu['a']):.0f} per CPU second\n"
          f"b ({args.b}): median {med(rates['b']):.0f} tokens/s, {med(cpu['b']):.0f} per CPU second\n"
          f"a / b per step: median {med(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"in CPU time {med(cpu_ratios):.2f}x (range {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})")


if __name__ == "__main__":
    main()
