"""Archive-scale output benchmark (issue 11) on the CPU with the tiny models.

N copies of one short real video are run through a whole job with a default
`output.target_file_mb`, then: how many answers/frames files the driver committed
(target: at most 1 of each per 250 videos), a rerun of the same job (target: plans
zero work, in under 10 s), and a rerun after adding 20 videos (target: exactly those
20 videos' pairs processed).

    PYTHONPATH=. .venv/bin/python bench/archive_scale.py --n 2000 \
        --out bench/results/archive_scale_cpu2_2026-12-01.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
VIDEO = REPO / "jobs/demo/videos/kinetics_armwrestling.mp4"
CLI = Path(sys.executable).parent / "moref-index"


def add_videos(videos: Path, start: int, count: int) -> None:
    for i in range(start, start + count):
        # real copies, not links: the listing and decode see N distinct files as in an archive
        shutil.copyfile(VIDEO, videos / f"v{i:05d}.mp4")


def job_config(work: Path, models: Path) -> Path:
    cfg = {
        "input": {"videos": str(work / "videos/*.mp4")},
        "questions": {"prompts": [{"question_id": "describe", "question": "Describe it."}]},
        "decode": {"num_frames": 4, "frame_size": 32, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {
            "model": str(models / "tiny-clip"),
            "pretrained": None,
            "frames_per_question": 4,
            "num_cpus": 0.25,
            "num_gpus": 0,
        },
        "answer": {
            "model": str(models / "tiny-llava-onevision"),
            "max_new_tokens": 2,
            "num_cpus": 0.5,
            "num_gpus": 0,
        },
        # target_file_mb, max_videos_per_file, flush_interval_s left at their defaults: that is
        # what is measured
        "output": {"path": str(work / "output")},
        # logical CPUs as in the demo job: the stages take fractions of one on 2 cores
        "ray": {"num_cpus": 4},
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_job(cfg: Path, name: str) -> dict:
    summary = cfg.parent / f"summary-{name}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(CLI), "run", str(cfg), "--summary-json", str(summary)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"run {name} failed: rc {proc.returncode}")
    s = json.loads(summary.read_text())
    keys = ("videos", "inputs", "skipped_done", "processed", "ok", "errors", "elapsed_s", "status")
    return {"wall_s": round(wall, 2), **{k: s.get(k) for k in keys}}


def count_files(output: Path) -> dict:
    def n(sub: str) -> int:
        return len(list((output / sub).glob("*.parquet")))

    return {"answers_files": n("answers"), "frames_files": n("frames")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--add", type=int, default=20)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--models", type=Path, default=None, help="tiny models dir (default: built)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="archive_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    models = args.models or work / "models"
    if not (models / "tiny-llava-onevision").exists():
        t0 = time.perf_counter()
        subprocess.run([str(CLI), "tiny-models", str(models)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        print(f"tiny-models: {time.perf_counter() - t0:.1f}s", flush=True)
    videos = work / "videos"
    videos.mkdir(exist_ok=True)
    add_videos(videos, 0, args.n)
    cfg = job_config(work, models)
    output = work / "output"

    run1 = run_job(cfg, "run1")
    files = count_files(output)
    print("run1", run1, files, flush=True)
    rerun = run_job(cfg, "rerun")
    print("rerun", rerun, flush=True)
    add_videos(videos, args.n, args.add)
    added = run_job(cfg, "added")
    files_after = count_files(output)
    print("added", added, files_after, flush=True)

    per250 = {k: round(v * 250 / args.n, 3) for k, v in files.items()}
    result = {
        "n": args.n,
        "added": args.add,
        "machine": f"cpu, {os.cpu_count()} cores",
        "video": VIDEO.name,
        "config": yaml.safe_load(cfg.read_text()),
        "run1": {**run1, "videos_per_s": round(args.n / run1["wall_s"], 3), **files},
        "files_per_250_videos": per250,
        "rerun": rerun,
        "added_run": {**added, **files_after},
        "targets": {
            "files_per_250_at_most_1": all(v <= 1 for v in per250.values()),
            "rerun_zero_work_under_10s": rerun["processed"] == 0 and rerun["wall_s"] < 10,
            "added_processes_exactly_added": added["processed"] == args.add
            and added["skipped_done"] == args.n,
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
