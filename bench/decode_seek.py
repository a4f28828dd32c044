#!/usr/bin/env python3
"""Decode cost of `decode.seek: exact` against `keyframe` on one archive-like video, on a CPU
backend or on NVDEC.

Writes (once, into --work) an H.264 video of --seconds at --width x --height, 30 fps, ~8 Mbit/s, a
keyframe every --keyframe-s, moving texture (bench/archive_video.py; past 80 s, an 80 s segment
repeated by remuxing, as bench/pipeline_gpu.py does), then decodes --frames uniformly sampled frames
from it with `pipeline.stages.decode.decode_video` (the decode stage's own function, in this
process, one decoder thread as `decode.num_cpus: 1` gives) in each seek mode, --repeats times, and
records wall and process CPU seconds and frames returned (with nvdec, the GPU's name too).
`--parallel N` then decodes the video N times at once in N processes (modules imported beforehand),
as N decode tasks would: the aggregate videos per hour that many decoders give (for nvdec: how far
one GPU's NVDEC engines go).

    .venv/bin/python bench/decode_seek.py --out bench/results
    python3 bench/decode_seek.py --backend nvdec --seconds 600 --repeats 1 --parallel 8 --out $OUT   # GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--keyframe-s", type=float, default=8.0)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="pyav", choices=["pyav", "decord", "nvdec"])
    parser.add_argument("--seeks", default="exact,keyframe", help="seek modes to time, in order")
    parser.add_argument("--parallel", type=int, default=0,
                        help="then decode the video this many times at once, in as many processes (0: skip)")
    parser.add_argument("--work", default="/tmp/moref-decode-seek")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)

    from archive_video import repeat_to_length, write_archive_video

    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import decode_video
    from pipeline.stages.decode.pyav_backend import PyAVBackend

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    video = work / f"archive_{args.width}x{args.height}_{args.seconds:g}s_k{args.keyframe_s:g}.mp4"
    if not video.exists():
        t0 = time.perf_counter()
        segment_s = 10 * args.keyframe_s
        if args.seconds <= segment_s:
            write_archive_video(video, args.seconds, args.width, args.height, keyframe_s=args.keyframe_s)
        else:  # whole GOPs repeated: every frame still decodes, writing costs seconds
            segment = work / f"segment_{video.name}"
            write_archive_video(segment, segment_s, args.width, args.height, keyframe_s=args.keyframe_s)
            repeat_to_length(segment, video, args.seconds)
            segment.unlink()
        print(f"wrote {video} in {time.perf_counter() - t0:.0f} s", flush=True)
    info = PyAVBackend(384).probe(str(video))
    report = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), "backend": args.backend,
              "video": {"seconds": info.duration_s, "width": info.width, "height": info.height, "fps": info.fps,
                        "mbit_s": video.stat().st_size * 8 / info.duration_s / 1e6, "keyframe_s": args.keyframe_s},
              "frames_sampled": args.frames, "modes": {}}
    if args.backend == "nvdec":  # the GPU whose NVDEC engines decode, beside the CPU that demuxes
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    gpu_share = 0.1 if args.backend == "nvdec" else 0.0  # nvdec's tasks must hold a GPU share
    configs = {seek: DecodeConfig(num_frames=args.frames, frame_size=384, num_cpus=1, seek=seek,
                                  backend=args.backend, num_gpus=gpu_share) for seek in args.seeks.split(",")}
    for seek, cfg in configs.items():
        runs = []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            decoded = decode_video(str(video), cfg, backend=args.backend)
            runs.append((time.perf_counter() - wall, time.process_time() - cpu))
        report["modes"][seek] = {
            "wall_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs),
            "runs": runs, "frames_returned": len(decoded.times_s),
            "first_times_s": [round(float(t), 3) for t in decoded.times_s[:10]]}
        print(seek, json.dumps(report["modes"][seek]), flush=True)
        if decoded.backend != args.backend:
            raise SystemExit(f"{args.backend} fell back to {decoded.backend}")
    if args.parallel:  # in the first seek mode
        report["parallel"] = parallel_decodes(str(video), next(iter(configs.values())), args.parallel)
        print("parallel", json.dumps(report["parallel"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_seek_{args.backend}_{args.width}x{args.height}_{report['date']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def _decode_after_barrier(uri: str, cfg, barrier, results) -> None:
    import pipeline.stages.decode  # imported before the clock starts
    if cfg.backend == "nvdec":
        import torch  # noqa: F401
    barrier.wait()
    start = time.perf_counter()
    pipeline.stages.decode.decode_video(uri, cfg)
    results.put(time.perf_counter() - start)


def parallel_decodes(uri: str, cfg, sessions: int) -> dict:
    """The video decoded `sessions` times at once in as many fresh processes, all started together
    once each has imported the decoders: the aggregate rate of that many decode tasks."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(sessions + 1), ctx.Queue()
    procs = [ctx.Process(target=_decode_after_barrier, args=(uri, cfg, barrier, results)) for _ in range(sessions)]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    each = [results.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join()
    return {"sessions": sessions, "seek": cfg.seek, "wall_s": wall, "per_video_s": each,
            "videos_per_hour": sessions / wall * 3600}


if __name__ == "__main__":
    sys.exit(main())
