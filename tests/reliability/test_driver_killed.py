"""The driver killed mid-run (SIGKILL of `moref-index run`, its own local Ray), then the same
command again: the union holds every pair exactly once and the rerun skips exactly the pairs the
killed run wrote. Neither run's output, console or Ray logs contain the storage credentials."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from pipeline.schema import Col
from tests.paths import video
from tests.reliability.helpers import (
    PROMPTS,
    assert_exactly_once,
    job,
    job_dict,
    kill,
    process_group,
    rows_of,
    wait_until,
)

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_cli(config: pathlib.Path, ray_tmp: str, log: pathlib.Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp  # its own Ray, its own logs (to search for secrets)
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(config)], cwd=ROOT, env=env,
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def reap_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Wait for the processes of the run's session to exit; kill, one by one, any that linger
    (Ray's agents outlive a killed driver for a while)."""
    deadline = time.monotonic() + grace_s
    while process_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in process_group(proc.pid):
        kill(pid)
    wait_until(lambda: not process_group(proc.pid), 20, what="the killed run's processes to exit")


def test_driver_killed_then_rerun_completes_exactly_once(tmp_path, s3_bucket):
    fs, bucket, options = s3_bucket
    ids = [f"clip{i}.mp4" for i in range(8)]
    for vid in ids:
        fs.put_file(str(video("kinetics_armwrestling.mp4")), f"{bucket}/in/{vid}")
    uris = [f"s3://{bucket}/in/{v}" for v in ids + ["missing.mp4"]]
    fs.pipe(f"{bucket}/in/manifest.jsonl", "".join(json.dumps({"video_uri": u}) + "\n" for u in uris).encode())
    key, secret = f"AKID{uuid.uuid4().hex[:12].upper()}", f"secret-{uuid.uuid4().hex}"
    storage = {"endpoint_url": options["client_kwargs"]["endpoint_url"], "key": key, "secret": secret}
    data = job_dict(f"s3://{bucket}/out", manifest=f"s3://{bucket}/in/manifest.jsonl", storage=storage,
                    run_id="driver", answer={"max_new_tokens": 48}, ray={"num_cpus": 4},
                    output_opts={"max_videos_per_file": 1})  # a commit per video: files appear mid-run
    data["guidance"]["videos_per_batch"] = 1  # videos reach the answer stage one by one: room to kill mid-run
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = job(**{"output": data["output"]["path"], "manifest": data["input"]["manifest"], "storage": storage})
    expected = {(v, p["question_id"]) for v in ids + ["missing.mp4"] for p in PROMPTS}
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes

    def written() -> list[str]:
        try:
            # committed files only: a commit's '_pending-' files are not visible yet
            return [p for p in fs.ls(f"{bucket}/out/answers", refresh=True)
                    if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("_")]
        except FileNotFoundError:
            return []

    try:
        first = start_cli(config, ray_tmp, tmp_path / "run1.log")
        try:
            wait_until(lambda: written() or first.poll() is not None, 240, 0.1, "the first answers file")
            assert first.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            first.kill()  # SIGKILL the driver only; its Ray follows it down
            first.wait()
        finally:
            reap_group(first)
        before = rows_of(cfg)
        done = len(before)
        assert 0 < done < len(expected), f"the kill came too late or too early: {done} pairs written"
        assert len(set((r["video_id"], r["question_id"]) for r in before)) == done

        second = start_cli(config, ray_tmp, tmp_path / "run2.log")
        try:
            assert second.wait(300) == 0, (tmp_path / "run2.log").read_text()[-3000:]
        finally:
            reap_group(second)
    finally:
        logs = [p for p in pathlib.Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
        log_blobs = {str(p): p.read_bytes() for p in logs}
        shutil.rmtree(ray_tmp, ignore_errors=True)

    rows = rows_of(cfg)
    assert_exactly_once(rows, expected)
    assert {(r["video_id"], r["status"]) for r in rows} == {(v, "ok") for v in ids} | {("missing.mp4", "error")}
    assert all(r[Col.ERROR_REASON] == "not_found" and "missing.mp4" in r[Col.ERROR_DETAIL]
               for r in rows if r["status"] == "error")
    summary = json.loads(fs.cat(f"{bucket}/out/runs/driver.json"))
    assert (summary["skipped_done"], summary["processed"], summary["status"]) == (
        done, len(expected) - done, "complete")
    console = (tmp_path / "run2.log").read_text()
    assert f"skipped (already done): {done}" in console

    # credentials: in no output, console line or Ray log of either run (the config file has them)
    assert log_blobs, "no Ray logs found"
    blobs = {**log_blobs, "run1.log": (tmp_path / "run1.log").read_bytes(), "run2.log": console.encode()}
    fs.invalidate_cache()
    blobs |= {p: fs.cat(p) for p in fs.find(f"{bucket}/out")}
    leaks = [name for name, blob in blobs.items() if secret.encode() in blob or key.encode() in blob]
    assert not leaks, leaks
