"""Generation speed on the demo model: phitune's streaming and batched paths vs plain model.generate.

    .venv/bin/python bench/generate_throughput.py [--prompts 64] [--max_new_tokens 48]

Single stream: decode tokens/s and time to first token of phitune's chat path vs one plain
`model.generate` call. Batch: 64 E2E prompts answered greedily, phitune's left-padded batches (as compare
and eval use) vs a plain generate loop one prompt at a time.
"""
import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch

from phitune import generate as gen
from phitune import models

# The E2E dev set sits in shared/ beside the checkout (or beside the folder of worktrees); E2E_CSV overrides.
DATA = Path(os.environ.get("E2E_CSV") or next(
    (p / "shared" / "data" / "e2e" / "devset.csv" for p in Path(__file__).resolve().parents[1:]
     if (p / "shared" / "data" / "e2e" / "devset.csv").is_file()), "../shared/data/e2e/devset.csv"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args()
    loaded = gen.load([], "smollm2-135m-instruct")
    tok, model = loaded.tokenizer, loaded.model
    with open(DATA, newline="", encoding="utf-8") as fh:
        mrs = list(dict.fromkeys(r["mr"] for r in csv.DictReader(fh)))[:args.prompts]
    convs = [[{"role": "user", "content": f"Describe this restaurant in one sentence: {mr}"}] for mr in mrs]
    sampling = gen.Sampling(max_new_tokens=args.max_new_tokens)
    stop = loaded.template.stop_token_ids()

    def plain(conv):
        ids = torch.tensor([loaded.template.encode_prompt(conv)])
        with torch.no_grad(), models.autocast(loaded.device, loaded.autocast_dtype):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    # ---- single stream
    plain(convs[0])
    rates, ttfts, plain_rates = [], [], []
    for conv in convs[:5]:
        t = time.perf_counter()
        n = plain(conv)
        plain_rates.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        first, text = None, ""
        for piece in gen.stream(loaded, conv, sampling):
            first = first or time.perf_counter() - t
            text += piece
        total = time.perf_counter() - t
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        ttfts.append(first)
        rates.append(n / total)
    print(f"single stream: phitune {statistics.median(rates):.1f} tok/s (time to first token "
          f"{1000 * statistics.median(ttfts):.0f} ms) vs plain generate {statistics.median(plain_rates):.1f} tok/s")

    # ---- batch
    t = time.perf_counter()
    plain_tokens = sum(plain(c) for c in convs)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    answers = gen.generate(loaded, convs, sampling, batch_size=args.batch_size)
    batch_s = time.perf_counter() - t
    batch_tokens = sum(a.tokens for a in answers)
    print(f"batch of {len(convs)}: phitune {batch_tokens / batch_s:.1f} tok/s ({batch_s:.1f} s) vs one-at-a-time "
          f"{plain_tokens / plain_s:.1f} tok/s ({plain_s:.1f} s): {plain_s / batch_s:.2f}x faster")


if __name__ == "__main__":
    main()
