#!/usr/bin/env bash
# GPU run (H100 / H200 device machine), from the repo root:
#     bash bench/gpu_run.sh [STEP ...]      STEP: tests, moref, question-sets, decode-step (default: all)
# Packages the GPU image lacks come from .gpu/pkgs.tar.xz (made by
# tools/gpu/pack-offline-packages.sh; ray, av, transformers 5.23, open_clip, pydantic...) or,
# failing that, from carried wheels in .whl/. Everything lands in $OUT: versions.log,
# gpu_tests.log, bench.log + bench_moref.{json,md}, question_sets.log +
# bench_question_sets.{json,md}, decode_step.log + decode_step.{json,md}. A failing step does not
# stop the next; the exit status is non-zero if any failed. Each step is bounded (tests 300 s, moref
# 300 s, question sets 200 s, decode step 200 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests moref question-sets decode-step)

source bench/gpu_env.sh

rc=0
for step in "${steps[@]}"; do
    case $step in
        tests) timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" ;;
        # BENCH_ARGS: extra arguments, e.g. "--tiny --device cpu" for a dry run without a GPU.
        # shellcheck disable=SC2086
        moref) timeout 300 python3 bench/bench_moref.py --out "$OUT" --budget-s 240 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
        # shellcheck disable=SC2086
        question-sets) timeout 200 python3 bench/bench_question_sets.py --out "$OUT" --budget-s 140 ${BENCH_ARGS:-} 2>&1 \
            | tee "$OUT/question_sets.log" ;;
        # shellcheck disable=SC2086
        decode-step) timeout 200 python3 bench/decode_step.py --out "$OUT" --frames 128,512 ${BENCH_ARGS:-} 2>&1 \
            | tee "$OUT/decode_step.log" ;;
        *) echo "unknown step $step"; false ;;
    esac
    status=$?
    echo "gpu_run: $step rc=$status"
    [ "$status" -eq 0 ] || rc=1
done
exit $rc
