#!/usr/bin/env bash
# `make demo`: fine-tune the demo model on examples/e2e_demo.jsonl, then compare base and tuned answers
# on held-out questions. The demo model is provisioned into ~/.cache/phitune on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
PHITUNE=.venv/bin/phitune
rm -rf runs/demo   # a fresh run each time (phitune train refuses to overwrite checkpoints silently)
$PHITUNE train --config examples/demo.yaml
$PHITUNE compare --adapter_path runs/demo/final_adapter --questions examples/questions.yaml \
    --max_new_tokens 80 --report runs/demo/compare.md
# One GGUF file for llama.cpp / Ollama (with a Modelfile beside it), checked before it is kept.
$PHITUNE export --adapter_path runs/demo/final_adapter --format ollama --outtype q8_0 --output runs/demo/tuned.gguf
echo
echo "Next: .venv/bin/phitune chat --adapter_path runs/demo/final_adapter"
echo "      llama-cli -m runs/demo/tuned.gguf -cnv   or   cd runs/demo && ollama create tuned -f Modelfile"
