#!/usr/bin/env bash
# The accelerator tables in one run (several minutes on one GPU): generation on the portable path against
# transformers on CUDA, in float32 and bfloat16, then bf16/float32 agreement, then training steps against
# transformers at batch 64 and 256 and the largest batch that fits. Run from a source checkout:
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
  for batch in 64 256; do  # training: tokens/s and MFU against transformers in bf16 autocast
    python bench/train.py --backend "$backend" --batch "$batch" --steps 10
  done
  for batch in 512 1024 2048 4096; do  # the largest batch our step trains at (until one does not fit)
    python bench/train.py --backend "$backend" --batch "$batch" --steps 2 --no-torch --pipeline-examples 0 || break
  done
} 2>&1 | tee bench-accelerator.log
