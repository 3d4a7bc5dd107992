#!/usr/bin/env bash
# The accelerator table in one run (a few minutes on one GPU): generation on the portable path against
# transformers on CUDA, in float32 and bfloat16, then bf16/float32 agreement. Run from a source checkout:
#   bash bench/accelerator.sh [gpu|tpu]        (outputs also go to bench-accelerator.log)
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${1:-gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  for dtype in float32 bfloat16; do
    python bench/generate.py --backend "$backend" --dtype "$dtype" --paths portable --runs 3 \
      --cases greedy1,greedy64,greedy256,beam10,beam4x64
  done
  python bench/precision.py --backend "$backend" --prompts 64 --batch-size 64
} 2>&1 | tee bench-accelerator.log
