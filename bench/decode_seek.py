#!/usr/bin/env python3
"""Decode cost of `decode.seek: exact` against `keyframe` on one archive-like video.

Writes (once, into --work) an H.264 video of --seconds at --width x --height, 30 fps, ~8 Mbit/s, a
keyframe every --keyframe-s, moving texture (bench/archive_video.py), then decodes --frames
uniformly sampled frames from it with `pipeline.stages.decode.decode_video` (the decode stage's own
function, in this process, one decoder thread as `decode.num_cpus: 1` gives) in each seek mode,
--repeats times, and records wall and process CPU seconds, frames returned and frames decoded.

    .venv/bin/python bench/decode_seek.py --out bench/results
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
    parser.add_argument("--backend", default="pyav", choices=["pyav", "decord"])
    parser.add_argument("--work", default="/tmp/moref-decode-seek")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)

    from archive_video import write_archive_video

    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import decode_video
    from pipeline.stages.decode.pyav_backend import PyAVBackend

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    video = work / f"archive_{args.width}x{args.height}_{args.seconds:g}s_k{args.keyframe_s:g}.mp4"
    if not video.exists():
        t0 = time.perf_counter()
        write_archive_video(video, args.seconds, args.width, args.height, keyframe_s=args.keyframe_s)
        print(f"wrote {video} in {time.perf_counter() - t0:.0f} s", flush=True)
    info = PyAVBackend(384).probe(str(video))
    report = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), "backend": args.backend,
              "video": {"seconds": info.duration_s, "width": info.width, "height": info.height, "fps": info.fps,
                        "mbit_s": video.stat().st_size * 8 / info.duration_s / 1e6, "keyframe_s": args.keyframe_s},
              "frames_sampled": args.frames, "modes": {}}
    for seek in ("exact", "keyframe"):
        cfg = DecodeConfig(num_frames=args.frames, frame_size=384, num_cpus=1, seek=seek)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_seek_{args.backend}_{args.width}x{args.height}_{report['date']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
