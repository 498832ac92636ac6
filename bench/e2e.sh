#!/usr/bin/env bash
# E2E NLG quality benchmark (about 15 minutes on a 2-core CPU):
#   split ../shared/data/e2e/devset.csv by meaning representation (70/10/20, no MR in two splits),
#   fine-tune the demo model with phitune, evaluate base and tuned on the held-out MRs (BLEU, chrF,
#   ROUGE-L against every reference of each MR) and write the table into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-runs/e2e}
CSV=${E2E_CSV:-../shared/data/e2e/devset.csv}
rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
PYTHONPATH=examples $PY bench/e2e_split.py "$CSV" "$OUT/data"
.venv/bin/phitune train --model smollm2-135m-instruct --dataset_path "$OUT/data/train.jsonl" \
    --val_path "$OUT/data/val.jsonl" --output_dir "$OUT/run" --epochs 1 --batch_size 16 \
    --gradient_accumulation_steps 1 --learning_rate 3e-4 --lora_r 16 --lora_alpha 32 --max_length 256 \
    --eval_steps 20 --no-gradient_checkpointing
.venv/bin/phitune eval --adapter_path "$OUT/run/final_adapter" --data "$OUT/data/test.jsonl" \
    --max_new_tokens 64 --batch_size 32 --output "$OUT/scores.json" | tee "$OUT/table.txt"
minutes=$(( ($(date +%s) - start + 59) / 60 ))
$PY - "$OUT" "$minutes" <<'PY'
import json, re, sys
from pathlib import Path
out, minutes = Path(sys.argv[1]), sys.argv[2]
scores = json.loads((out / "scores.json").read_text())
table = (out / "table.txt").read_text().strip()
doc = Path("docs/benchmarks.md")
text = doc.read_text()
section = (f"<!-- e2e:start -->\nHeld-out E2E MRs: {scores['questions']} questions (every reference of each MR), "
           f"demo model fine-tuned with phitune on the training MRs for one epoch; whole run {minutes} min "
           f"(`bash bench/e2e.sh`).\n\n```\n{table}\n```\n<!-- e2e:end -->")
text = re.sub(r"<!-- e2e:start -->.*<!-- e2e:end -->", section, text, flags=re.S)
doc.write_text(text)
print(f"docs/benchmarks.md updated ({minutes} min)")
PY
