#!/usr/bin/env bash
# GPU run (H100 / H200 device machine), from the repo root:
#     bash bench/gpu_run.sh [STEP ...]      STEP: tests, moref, question-sets (default: all three)
# Packages the GPU image lacks come from .gpu/pkgs.tar.xz (made by
# tools/gpu/pack-offline-packages.sh; ray, av, transformers 5.23, open_clip, pydantic...) or,
# failing that, from carried wheels in .whl/. Everything lands in $OUT: versions.log,
# gpu_tests.log, bench.log + bench_moref.{json,md}, question_sets.log +
# bench_question_sets.{json,md}. A failing step does not stop the next; the exit status is
# non-zero if any failed. Each step is bounded (tests 300 s, moref 300 s, question sets 200 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests moref question-sets)

if [ -f .gpu/pkgs.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .gpu/pkgs.tar.xz -C /tmp/site || { echo "package tarball failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
elif compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no .gpu/pkgs.tar.xz or .whl/ carried: using the image's packages"
    export PYTHONPATH=$PWD
fi

python3 - <<'PY' 2>&1 | tee "$OUT/versions.log"
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "tokenizers", "huggingface_hub", "safetensors", "numpy", "ray", "av", "open_clip"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # report, do not stop: the tests say what matters
        print(name, "IMPORT FAILED:", repr(exc))
PY
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv

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
        *) echo "unknown step $step"; false ;;
    esac
    status=$?
    echo "gpu_run: $step rc=$status"
    [ "$status" -eq 0 ] || rc=1
done
exit $rc
