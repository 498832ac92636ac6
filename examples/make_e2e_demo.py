"""Build the demo dataset from the E2E NLG development set (Novikova, Dusek, Rieser, SIGDIAL 2017, CC BY-SA 4.0).

    python examples/make_e2e_demo.py ../shared/data/e2e/devset.csv

Writes examples/e2e_demo.jsonl (prompt/response pairs) and examples/questions.yaml (held-out meaning
representations: no MR appears in both). Split by MR, deterministic.
"""
import csv
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path

PROMPT = "Write one sentence describing this restaurant: {mr}"


def main(csv_path, out_dir=Path(__file__).parent, train_mrs=160, refs_per_mr=2, questions=8):
    by_mr = OrderedDict()
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_mr.setdefault(row["mr"], []).append(row["ref"])
    mrs = list(by_mr)
    random.Random(0).shuffle(mrs)
    train, held = mrs[:train_mrs], mrs[train_mrs:train_mrs + questions]
    with open(out_dir / "e2e_demo.jsonl", "w", encoding="utf-8") as fh:
        for mr in train:
            for ref in by_mr[mr][:refs_per_mr]:
                fh.write(json.dumps({"prompt": PROMPT.format(mr=mr), "response": ref}) + "\n")
    with open(out_dir / "questions.yaml", "w", encoding="utf-8") as fh:
        fh.write("# phitune compare --adapter_path runs/demo/final_adapter --questions examples/questions.yaml\n")
        fh.write("# Held-out E2E meaning representations (none of them is in e2e_demo.jsonl).\nquestions:\n")
        for mr in held:
            fh.write(f"  - prompt: {json.dumps(PROMPT.format(mr=mr))}\n")
            fh.write(f"    expected: {json.dumps(by_mr[mr][0])}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/e2e/devset.csv")
