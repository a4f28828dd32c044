#!/usr/bin/env bash
# GPU run (H100 / H200 device machine), from the repo root:
#     bash bench/gpu_run.sh
# Installs the carried wheels (.whl/: transformers 5.23 and what it needs beyond the image) into
# /tmp/site, runs the CUDA tests, then the Free-MoRef benchmark. Everything lands in $OUT:
# gpu_tests.log, bench.log, bench_moref.json, bench_moref.md. A test failure does not stop the
# benchmark; the exit status is non-zero if either failed. Bounded to ~9.5 minutes in the worst
# case (tests 150 s, benchmark 400 s, with the benchmark starting no new case after 300 s);
# a normal run takes about 4-5 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no .whl/ carried: using the image's packages"
    export PYTHONPATH=$PWD
fi

python3 - <<'EOF' 2>&1 | tee "$OUT/versions.log"
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "tokenizers", "huggingface_hub", "safetensors", "numpy", "accelerate"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # report, do not stop: the tests say what matters
        print(name, "IMPORT FAILED:", repr(exc))
import freemoref.engine, freemoref.video_llm  # noqa: E401  the product imports
print("freemoref imports ok")
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv

timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?
# BENCH_ARGS: extra arguments, e.g. "--tiny --device cpu" for a dry run of this script without a GPU.
# shellcheck disable=SC2086
timeout 400 python3 bench/bench_moref.py --out "$OUT" --budget-s 300 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=$?
echo "gpu_run: tests rc=$tests_rc, bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
