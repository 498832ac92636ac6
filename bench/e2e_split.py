"""Split the E2E dev set by meaning representation (no MR in two splits) into phitune JSONL files.

    python bench/e2e_split.py ../shared/data/e2e/devset.csv OUT_DIR [--refs_per_train_mr 2]

train.jsonl / val.jsonl: one prompt/response record per (MR, reference), at most --refs_per_train_mr
references per MR; test.jsonl: every reference of each test MR (phitune eval groups them per prompt).
"""
import argparse
import csv
import json
import random
from pathlib import Path

from make_e2e_demo import PROMPT  # the demo's prompt wording, so demo and benchmark agree


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("out")
    ap.add_argument("--refs_per_train_mr", type=int, default=2)
    ap.add_argument("--fractions", default="0.7,0.1,0.2")
    args = ap.parse_args()
    by_mr = {}
    with open(args.csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_mr.setdefault(row["mr"], []).append(row["ref"])
    mrs = sorted(by_mr)
    random.Random(1234).shuffle(mrs)
    f_train, f_val, _ = (float(x) for x in args.fractions.split(","))
    a, b = round(len(mrs) * f_train), round(len(mrs) * (f_train + f_val))
    splits = {"train": mrs[:a], "val": mrs[a:b], "test": mrs[b:]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, keys in splits.items():
        limit = None if name == "test" else args.refs_per_train_mr
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for mr in keys:
                for ref in by_mr[mr][:limit]:
                    fh.write(json.dumps({"prompt": PROMPT.format(mr=mr), "response": ref}) + "\n")
        print(f"{name}: {len(keys)} MRs")
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])


if __name__ == "__main__":
    main()
