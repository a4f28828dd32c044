# Sourced (from the repo root, with $OUT set) by bench/gpu_run.sh and bench/pipeline_gpu.sh on the
# device machine: puts the packages the GPU image lacks on PYTHONPATH, from .gpu/pkgs.tar.xz (made
# by tools/gpu/pack-offline-packages.sh) or else carried wheels in .whl/, then records the versions
# in use and the GPUs in $OUT/versions.log.
if [ -f .gpu/pkgs.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .gpu/pkgs.tar.xz -C /tmp/site || { echo "unpacking .gpu/pkgs.tar.xz failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
    # the nvdec decode backend's PyNvVideoCodec (tools/gpu/pack-nvdec.sh), when carried
    if [ -f .gpu/nvdec.tar.xz ]; then
        tar -xJf .gpu/nvdec.tar.xz -C /tmp/site || { echo "unpacking .gpu/nvdec.tar.xz failed"; exit 1; }
    fi
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
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "numpy", "ray", "av",
             "open_clip", "pydantic", "pyarrow", "yaml", "PyNvVideoCodec"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # report, do not stop: the tests and benchmarks say what matters
        print(name, "IMPORT FAILED:", repr(exc))
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
