#!/usr/bin/env bash
# Pack the Python packages that the GPU machines' image lacks into one compressed tarball that can
# travel with a run (those machines have no package index). Python 3.12, x86-64.
#
#   bash tools/gpu/pack-offline-packages.sh OUT.tar.xz [--with-decord]
#
# Contents: ray 2.60.0 (without its Java jars, rllib, serve, llm and the dashboard's web build),
# av 18.1.0, transformers 5.23.0, open_clip_torch 3.3.0 + ftfy + wcwidth, pydantic 2.14.3 +
# pydantic-core + annotated-types + typing-inspection + typing-extensions, jsonschema 4.26.0 +
# referencing + rpds-py + jsonschema-specifications; decord 0.6.0 with --with-decord. Shared
# libraries are stripped of symbols. About 47 MB (57 MB with decord); takes ~6 minutes on 2 cores.
# On the GPU machine (it has torch 2.11 cu130, pyarrow, pandas, numpy, fsspec, timm, tokenizers,
# huggingface-hub already):
#   mkdir -p /tmp/site && tar -xJf OUT.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# Checked 2026-11-30 on an H200 machine: Ray Data pipeline with a CLIP actor and a Video-LLM actor,
# PyAV decoding every test video.
set -euo pipefail
out=${1:?usage: pack-offline-packages.sh OUT.tar.xz [--with-decord]}
extra=()
[ "${2:-}" = "--with-decord" ] && extra+=(decord==0.6.0)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$work/whl" ray==2.60.0 av==18.1.0 transformers==5.23.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 "${extra[@]}"
python3 -m pip install -q --no-deps --no-index --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" --target "$work/site" "$work"/whl/*.whl
cd "$work/site"
rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build open_clip_train bin
find . -name __pycache__ -type d -prune -exec rm -rf {} +
strip --strip-unneeded ray/_raylet.so
find av -name '*.so' -exec strip --strip-unneeded {} +
strip ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server
cd - >/dev/null
tar -C "$work/site" -cf - . | xz -9e -T0 > "$out"
echo "wrote $out ($(du -h "$out" | cut -f1))"
