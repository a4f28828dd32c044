#!/usr/bin/env bash
# The whole-pipeline benchmark on a GPU device machine (H100 / H200), from the repo root:
#     bash bench/pipeline_gpu.sh                          # every visible GPU, 128 and 512 frames
#     bash bench/pipeline_gpu.sh --gpus 1,2 --frames 128  # any bench/pipeline_gpu.py options
# Unpacks .gpu/pkgs.tar.xz (ray, av, open_clip, pydantic, transformers 5.23: made with
# tools/gpu/pack-offline-packages.sh .gpu/pkgs.tar.xz, carried with the run) into /tmp/site,
# prints versions, then runs bench/pipeline_gpu.py. Everything lands in $OUT (default
# out/pipeline_gpu): pipeline_gpu_<device>_<date>.json and .md, pipeline_gpu.log, one log per case.
# Bounded to under 9 minutes: the benchmark stops cases to fit --budget-s (470 s by default,
# model build included) and is killed at 525 s; the JSON is rewritten after every case.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-out/pipeline_gpu}
mkdir -p "$OUT"

source bench/gpu_env.sh

timeout "${PIPELINE_GPU_TIMEOUT_S:-525}" python3 bench/pipeline_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/pipeline_gpu.log"
rc=${PIPESTATUS[0]}
echo "pipeline_gpu: rc=$rc"
exit "$rc"
