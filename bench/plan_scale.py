#!/usr/bin/env python3
"""Planning at archive scale: a manifest of N synthetic videos, 99% of them already answered.

For each N (default 10k, 100k, 1M) it writes a Parquet manifest of N rows and, for 99% of the
videos, answers rows for both prompts committed the way a run commits them (large answers files and
their record under _commits/, pipeline/store/commit_log.py; 1% of those rows are transient errors to
redo). It then times `runner.plan_work` (the manifest read by Ray Data, the record read and indexed,
the planning tasks, the summary counts) in a fresh Python process on a fresh local Ray (`plan_s`,
which includes starting Ray's worker processes), once more on the now warm workers (`plan_warm_s`),
and the driver's peak RSS (`resource.getrusage`; the driver only: Ray's workers are separate processes).

    python3 bench/plan_scale.py --out bench/results            # 10k, 100k, 1M
    python3 bench/plan_scale.py --sizes 2000 --out /tmp/p      # a quick self-check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DONE_SHARE = 0.99
ROWS_PER_ANSWERS_FILE = 250_000  # "a few large files"
PROMPTS = [{"question_id": "caption", "question": "Describe the video."},
           {"question_id": "who", "question": "Who is in the video?"}]


def make_inputs(n: int, work: pathlib.Path) -> dict:
    """Manifest, committed answers (99% of the videos done, 1% of their rows transient errors to
    redo) and the job config."""
    import numpy as np

    from pipeline.config import parse_job_config
    from pipeline.schema import ANSWERS_SCHEMA
    from pipeline.store.commit_log import CommitLog, write_pending
    from pipeline.store.output_store import ANSWERS_DIR, OutputStore

    ids = pc.binary_join_element_wise("archive/", pa.array([f"{i:08d}" for i in range(n)]), ".mp4", "")
    pq.write_table(pa.table({"video_id": ids, "video_uri": pc.binary_join_element_wise("/data/", ids, "")}),
                   work / "manifest.parquet")
    manifest = {"manifest": str(work / "manifest.parquet"), "planning": "tasks"}
    cfg = parse_job_config({"run_id": "bench", "input": manifest,
                            "questions": {"prompts": PROMPTS},
                            "output": {"path": str(work / "out"), "retry_errors": True}})
    store = OutputStore(cfg.output)
    log = CommitLog(store)
    p = len(PROMPTS)
    done = int(n * DONE_SHARE)
    rows = done * p
    retry = rows // 100  # of the done rows, 1% are transient errors: redone, counted as retried
    for start in range(0, rows, ROWS_PER_ANSWERS_FILE):
        k = min(rows, start + ROWS_PER_ANSWERS_FILE) - start
        pair = np.arange(start, start + k)
        error = pa.array(pair < retry)
        vids = ids.take(pa.array(pair // p))
        cols = {name: pa.nulls(k, ANSWERS_SCHEMA.field(name).type) for name in ANSWERS_SCHEMA.names}
        cols.update(run_id=pa.array(["old"] * k), video_id=vids, video_uri=vids,
                    question_id=pa.array([PROMPTS[i % p]["question_id"] for i in pair]),
                    question=pa.array([PROMPTS[i % p]["question"] for i in pair]),
                    status=pc.if_else(error, "error", "ok"),
                    error_reason=pc.if_else(error, pa.scalar("timeout"), pa.scalar(None, pa.string())))
        table = pa.table(cols, schema=ANSWERS_SCHEMA)
        log.apply([write_pending(store, table, ANSWERS_DIR, f"part-old-{start:09d}.parquet")], {})
    return {"config": cfg.model_dump(mode="json"), "expected": {
        "videos": n, "inputs": n * p, "skipped_done": rows - retry, "retried_errors": retry,
        "pending_pairs": n * p - rows + retry}}


def measure(config: dict) -> dict:
    """In this (fresh) process: start Ray, plan, report times and the driver's peak RSS."""
    import ray

    from pipeline.config import JobConfig
    from pipeline.run.runner import plan_work
    from pipeline.store.output_store import OutputStore

    cfg = JobConfig.model_validate(config)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    plan, summary = plan_work(cfg, OutputStore(cfg.output))
    t2 = time.perf_counter()
    first = plan.source().take(1)  # the pipeline's source streams: its first video is ready
    t3 = time.perf_counter()
    plan_work(cfg, OutputStore(cfg.output))  # again, on warm workers: the part that grows with N
    t4 = time.perf_counter()
    return {"ray_init_s": round(t1 - t0, 2), "plan_s": round(t2 - t1, 2), "first_video_s": round(t3 - t2, 2),
            "plan_warm_s": round(t4 - t3, 2),
            "peak_driver_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "videos": summary.videos, "inputs": summary.inputs, "skipped_done": summary.skipped_done,
            "retried_errors": summary.retried_errors, "pending_pairs": plan.pending_pairs,
            "first_pending": first[0]["video_id"] if first else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", required=True)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the measuring child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(pathlib.Path(args.measure).read_text()))))
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"plan-scale-{n}-") as tmp:
            work = pathlib.Path(tmp)
            t = time.perf_counter()
            inputs = make_inputs(n, work)
            setup_s = time.perf_counter() - t
            (work / "config.json").write_text(json.dumps(inputs["config"]))
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--measure", str(work / "config.json")],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(f"N={n}: measuring failed:\n{proc.stderr[-4000:]}")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            correct = all(got[k] == v for k, v in inputs["expected"].items())
            row = {"n": n, "setup_s": round(setup_s, 1), **got, "counts_correct": correct}
            print(json.dumps(row), flush=True)
            results.append(row)
            if not correct:
                sys.exit(f"N={n}: counts {got} differ from {inputs['expected']}")
    date = dt.date.today().isoformat()
    report = {"benchmark": "plan_scale", "device": f"cpu ({os.cpu_count()} cores)", "date": date,
              "python": platform.python_version(), "done_share": DONE_SHARE, "results": results}
    path = out / f"plan_scale_cpu{os.cpu_count()}_{date}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
