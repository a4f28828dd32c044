#!/usr/bin/env bash
# Pack PyNvVideoCodec (NVIDIA's NVDEC bindings, the `nvdec` decode backend) for the GPU machines,
# which have no package index: only the files the decoder loads (its CUDA 12.1 and 13.0 builds, the
# bundled libavformat/libavutil it demuxes with and its CUDA runtime), not the wheel's samples, the
# FFmpeg source tarball or the copies of each library under three names. ~27 MB wheel -> ~3 MB.
#
#   bash tools/gpu/pack-nvdec.sh .gpu/nvdec.tar.xz
#
# bench/gpu_env.sh unpacks it beside .gpu/pkgs.tar.xz (tools/gpu/pack-offline-packages.sh).
set -euo pipefail
out=${1:?usage: pack-nvdec.sh OUT.tar.xz}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$work/whl" pynvvideocodec==2.2.4
mkdir -p "$work/site"
(cd "$work/site" && python3 -m zipfile -e "$work"/whl/pynvvideocodec-*.whl .)
cd "$work/site"
rm -rf samples benchmarks pynvvideocodec-*.data
# The extension modules' RPATH is $ORIGIN:$ORIGIN/../pynvvideocodec. and they need the .so.N names.
rm -f PyNvVideoCodec/libavformat.so PyNvVideoCodec/libavformat.so.63.* PyNvVideoCodec/libavutil.so \
    PyNvVideoCodec/libavutil.so.61.*
find . -name '*.so*' -exec chmod +x {} +
cd - >/dev/null
tar -C "$work/site" -cf - . | xz -9e -T0 > "$out"
echo "wrote $out ($(du -h "$out" | cut -f1))"
