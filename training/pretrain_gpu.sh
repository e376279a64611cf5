#!/usr/bin/env bash
# One run of the demo model's pretraining on the GPU machine (one H200, 16 cores), from the repo root:
#
#     bash training/pretrain_gpu.sh            # MINUTES=8 DEADLINE_S=530 WORKERS=15 by default
#
# Resumes from .gpu/demo-ckpt/ when it holds a checkpoint (carry that folder), else from --resume FOLDER when given
# (an exported model such as assets/demo-llava continues from its pretraining.json), else starts from scratch.
# Writes to $OUT (at most 8 files, all under 16 MiB: what a run may send back): ckpt/ (fp16 weight shards
# + state.json), metrics.jsonl, eval.json, log.txt. For the next run, copy $OUT/ckpt/ to .gpu/demo-ckpt/.
# Extra arguments go to python -m training.pretrain (e.g. --plan-minutes 24 to train past the 14-minute plan).
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/pretrain-out}
mkdir -p "$OUT"
resume=()
if [ -f .gpu/demo-ckpt/state.json ]; then resume=(--resume .gpu/demo-ckpt); fi
python3 -m training.pretrain --preset demo --out "$OUT" "${resume[@]}" --minutes "${MINUTES:-8}" \
    --deadline-s "${DEADLINE_S:-530}" --workers "${WORKERS:-15}" "$@" 2>&1 | tee "$OUT/log.txt"
