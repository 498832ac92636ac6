#!/usr/bin/env bash
# One prepared GPU run (< 8 minutes on an H100/H200): LoRA speed, MFU and peak memory for full-size
# Phi-2 and Phi-3.5-mini built from configs, plus QLoRA when bitsandbytes is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 450 "$PY" bench/gpu_bench.py | tee "${OUT:-/tmp}/gpu_bench.txt"
