#!/usr/bin/env bash
# Preference tuning on a task with exact answers (about 45 minutes on a 2-core AVX2 CPU, demo model):
#   E2E restaurant records (fields in a random order) -> one line of JSON with fixed keys and order.
#   1. build the task from ../shared/data/e2e/devset.csv, split by MR (no MR in both train and test)
#   2. SFT: phitune train on the training MRs
#   3. mine: the SFT model answers the training MRs in new field orders; its wrong answers (plus synthetic
#      near misses: a name copied slightly wrong, a field dropped or invented, the record's key names, the
#      record's order, prose instead of JSON, rambling) become the rejected answers of preference pairs
#   4. DPO from the SFT adapter: phitune train --method dpo --adapter_path runs/.../sft/final_adapter, twice:
#      plain DPO, and with --rpo_alpha (the chosen answers' NLL beside the DPO loss)
#   5. phitune eval for the base, SFT alone, SFT+DPO and SFT+DPO with RPO: exact match of the generated JSON on every held-out
#      prompt; preference accuracy on held-out pairs of two kinds: the SFT model's own wrong answers on the
#      held-out prompts (what DPO learns to avoid, on records it never saw) and synthetic near misses
#   6. the figures go into docs/training.md (between the dpo-task markers)
# Other sizes: TRAIN_MRS=40 TEST_MRS=12 SFT_EPOCHS=1 bash bench/dpo_quality.sh (then no docs update).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PHITUNE="$PY -m phitune"
OUT=${OUT:-runs/dpo_task}
# the E2E dev set sits in shared/ beside the checkout (or beside the folder of worktrees); E2E_CSV overrides
CSV=${E2E_CSV:-}
if [ -z "$CSV" ]; then
  for c in ../shared/data/e2e/devset.csv ../../shared/data/e2e/devset.csv; do [ -f "$c" ] && CSV=$c && break; done
fi
[ -f "${CSV:-}" ] || { echo "E2E dev set not found: set E2E_CSV to devset.csv" >&2; exit 2; }
MODEL=${MODEL:-smollm2-135m-instruct}
SIZE=(--train_mrs "${TRAIN_MRS:-96}" --test_mrs "${TEST_MRS:-48}")
rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)

$PY bench/dpo_task.py build "$CSV" "$OUT/data" "${SIZE[@]}"

$PHITUNE train --model "$MODEL" --dataset_path "$OUT/data/sft.jsonl" --output_dir "$OUT/sft" \
    --epochs "${SFT_EPOCHS:-3}" --batch_size 16 --gradient_accumulation_steps 1 --learning_rate "${SFT_LR:-6e-4}" \
    --lora_r 16 --lora_alpha 32 --max_length 256 --val_split 0 --seed 0

$PY bench/dpo_task.py mine "$OUT/data" "$OUT/sft/final_adapter" --max_pairs "${MAX_PAIRS:-192}"

# plain DPO, and DPO with the chosen answers' NLL beside it (RPO), from the same SFT adapter and pairs
for variant in dpo rpo; do
  EXTRA=()
  [ "$variant" = rpo ] && EXTRA=(--rpo_alpha "${RPO_ALPHA:-1.0}")
  $PHITUNE train --method dpo --beta "${BETA:-0.1}" "${EXTRA[@]}" --adapter_path "$OUT/sft/final_adapter" \
      --dataset_path "$OUT/data/train_pairs.jsonl" --output_dir "$OUT/$variant" --epochs "${DPO_EPOCHS:-1}" \
      --batch_size 8 --gradient_accumulation_steps 1 --learning_rate "${DPO_LR:-2e-4}" --max_length 256 \
      --val_split 0 --seed 0
done

MODELS=(--adapter_path "sft=$OUT/sft/final_adapter" --adapter_path "dpo=$OUT/dpo/final_adapter"
        --adapter_path "rpo=$OUT/rpo/final_adapter")
# exact answers over every held-out prompt; preference accuracy on the two kinds of held-out pairs
$PHITUNE eval "${MODELS[@]}" --data "$OUT/data/test.jsonl" --max_new_tokens 96 --batch_size 32 --max_length 256 \
    --output "$OUT/answers.json" | tee "$OUT/table.txt"
$PHITUNE eval "${MODELS[@]}" --data "$OUT/data/test_pairs_own.jsonl" --no_generate --batch_size 32 \
    --max_length 256 --output "$OUT/own.json" | tee -a "$OUT/table.txt"
$PHITUNE eval "${MODELS[@]}" --data "$OUT/data/test_pairs.jsonl" --no_generate --batch_size 32 \
    --max_length 256 --output "$OUT/synthetic.json" | tee -a "$OUT/table.txt"

minutes=$(( ($(date +%s) - start + 59) / 60 ))
DOC=()
[ -z "${TRAIN_MRS:-}${TEST_MRS:-}" ] && DOC=(--doc docs/training.md)
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
$PY bench/dpo_task.py report "$OUT/data" "$OUT/answers.json" --own "$OUT/own.json" \
    --synthetic "$OUT/synthetic.json" --minutes "$minutes" --machine "$CPU, $(nproc) cores" "${DOC[@]}"
