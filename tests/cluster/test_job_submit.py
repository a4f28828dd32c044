"""The cluster path for real: a Ray head started with `ray start --head`, the demo job submitted to it
with the `ray job submit` CLI and `--working-dir` (the repository, cut down by .rayignore), its
Parquet outputs checked, and the job's metrics scraped from the head's Prometheus endpoint; and the
README's cluster recipe run as written, in a copy of the repository.

The head is `moref-index cluster start`'s (jobs/local_cluster.py): its own short --temp-dir (so no
other `ray.init()` on the machine finds and joins it), every port it listens on picked free (Ray's
defaults would collide with any other Ray on the machine), its own token (a head turns Ray's token
authentication on whenever a token exists, e.g. the ~/.ray/auth_token an earlier ray.init() wrote),
an environment without the session's RAY_* variables, and its own process group, which the
teardown ends (`ray stop` would stop every Ray on the machine). A failure prints the head's logs.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pyarrow.dataset as pads
import pytest
import yaml

from jobs.local_cluster import LocalHead, ray_executable, start_head
from tests.paths import DEMO_VIDEOS, REPO
from tests.prometheus import sample, scrape

RAY = ray_executable()
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
JOB_TIMEOUT_S = 300  # the demo job took 45 to 90 s here on 2 cores shared with other test runs
RECIPE_TIMEOUT_S = 900  # the README's block: tiny models built, a head started, the demo job


@contextlib.contextmanager
def logs_on_failure(head: LocalHead) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(head.logs())  # pytest shows a failed test's captured output
        raise


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalHead]:
    """A head of the test's own (jobs/local_cluster.py: temp dir, free ports, token, process group);
    a start that times out on a loaded machine is tried once more."""
    head = start_head(num_cpus=4)  # logical CPUs: the demo's stages ask for fractions of one
    try:
        yield head
    finally:
        head.stop()


def demo_pairs() -> set[tuple[str, str]]:
    """The demo job's (video_id, question_id) pairs: its questions file's, plus each prompt per video."""
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    videos = {pathlib.Path(p).name for pattern in cfg["input"]["videos"]
              for p in glob.glob(str(DEMO_CONFIG.parent / pattern))}
    assert videos == {p.name for p in DEMO_VIDEOS.iterdir() if p.suffix in (".mp4", ".mkv", ".avi")}
    questions = DEMO_CONFIG.parent / cfg["questions"]["file"]
    pairs = {(q["video_id"], q["question_id"]) for q in map(json.loads, questions.read_text().splitlines())}
    return pairs | {(v, p["question_id"]) for v in videos for p in cfg["questions"]["prompts"]}






def test_demo_job_submitted_with_the_cli(ray_head, tiny_model_dir, tmp_path):
    run_id = f"cluster-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    # Videos and questions travel in the working dir (the config's relative paths); the models
    # (built by the test session, never uploaded) and the output are absolute paths on this machine.
    entrypoint = [sys.executable, "-m", "jobs.cli", "run", "jobs/configs/demo.yaml",
                  "--set", f"run_id={run_id}", "--set", f"output.path={out}",
                  "--set", f"guidance.model={tiny_model_dir['clip']}",
                  "--set", f"answer.model={tiny_model_dir['llava']}", "--set", "ray.progress_interval_s=1",
                  # planned in Ray tasks, as an archive on object storage is (local globs default to the driver)
                  "--set", "input.planning=tasks"]
    submit = [RAY, "job", "submit", "--address", ray_head.address, "--working-dir", str(REPO),
              "--submission-id", run_id, "--log-style", "record", "--", *entrypoint]
    with logs_on_failure(ray_head):
        done = subprocess.run(submit, env=ray_head.env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-6000:]

        # What was uploaded: the repository without what .gitignore and .rayignore leave out.
        packages = list(ray_head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*/"))
        assert len(packages) == 1, packages
        uploaded = {p.name for p in packages[0].iterdir()}
        assert {"jobs", "pipeline", "freemoref", "pyproject.toml"} <= uploaded
        assert not uploaded & {".git", ".venv", ".cache", "tests", "bench", "demo-output"}, uploaded

        expected = demo_pairs()
        rows = pads.dataset(str(out / "answers"), format="parquet").to_table().to_pylist()
        assert len(rows) == len(expected) == 7
        assert {(r["video_id"], r["question_id"]) for r in rows} == expected
        assert all(r["status"] == "ok" and r["run_id"] == run_id for r in rows), rows
        frames = pads.dataset(str(out / "frames"), format="parquet").to_table(columns=["video_id"])
        assert set(frames.column("video_id").to_pylist()) == {v for v, _ in expected}
        summary = json.loads((out / "runs" / f"{run_id}.json").read_text())
        assert (summary["status"], summary["processed"], summary["ok"]) == ("complete", 7, 7)

        # The driver's log is not a terminal: one progress line a second, and no Ray Data progress
        # bars, neither the planning's nor the pipeline's.
        progress = re.findall(r"progress: .*", log)
        assert len(progress) >= 2, log[-4000:]
        assert re.fullmatch(r"progress: listed 3 videos \(7 pairs\); decoded 3, embedded 3 videos; answered 7/7 pairs, "
                            r"committed 7; 0 errors; [\d.]+ pairs/s, done after \S+", progress[-1]), progress
        assert "Running Dataset" not in log

        # The metrics, tagged with the run_id, on the head's Prometheus endpoint. Ray's agent
        # exports them every few seconds, so poll until the last commit shows (or the deadline).
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            text = scrape(ray_head.ports["metrics"])
            if sample(text, "ray_moref_pairs_done_total", run_id=run_id, status="ok") == 7:
                break
            time.sleep(2)
        run = {"run_id": run_id}
        assert sample(text, "ray_moref_pairs_done_total", **run, status="ok") == 7, text[-3000:]
        assert sample(text, "ray_moref_videos_done_total", **run) == 3
        assert sample(text, "ray_moref_errors_total", **run) is None  # no error rows
        assert sample(text, "ray_moref_tokens_total", **run, kind="output") == sum(r["output_tokens"] for r in rows)
        assert sample(text, "ray_moref_tokens_total", **run, kind="visual") == sum(
            r["visual_tokens_used"] for r in rows)
        saved = sum(r["total_flops_native"] - r["total_flops"] for r in rows)
        assert saved > 0  # Free-MoRef (2 references) costs less than the native forward
        assert sample(text, "ray_moref_flops_saved_total", **run) == pytest.approx(saved, rel=1e-9)
        decode = sum({r["video_id"]: r["decode_s"] for r in rows}.values())  # once per video
        assert sample(text, "ray_moref_stage_seconds_total", **run, stage="decode") == pytest.approx(decode)
        assert sample(text, "ray_moref_stage_duration_seconds_count", **run, stage="generate") == 7


def readme_cluster_recipe() -> str:
    """The README's bash block that starts a head with `moref-index cluster start`, as written."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (recipe,) = [b for b in blocks if "cluster start" in b and "job submit" in b]
    return recipe


def test_the_readme_cluster_recipe_runs_as_written(tmp_path):
    """In a copy of the repository (the block writes .cache/models and cluster-output/ under the
    current folder), beside a `demo-output` an earlier `make demo` left and another local Ray."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "demo-output", "cluster-output", "__pycache__", ".mypy_cache", ".ruff_cache"))
    (checkout / ".venv").symlink_to(REPO / ".venv")
    (checkout / "demo-output" / "answers").mkdir(parents=True)  # what `make demo` leaves: not the job's output
    before = {p.name for p in pathlib.Path("/tmp").glob("moref-rh-*")}
    # what the block leaves running if it fails half-way is stopped (only heads it started)
    script = ('trap \'[ -d "${HEAD_DIR:-/nonexistent}" ] && .venv/bin/moref-index cluster stop "$HEAD_DIR"\' EXIT\n'
              "set -euo pipefail\n" + readme_cluster_recipe())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=RECIPE_TIMEOUT_S)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-3000:]
    # the head it started is gone, folder and processes
    started = {p.name for p in pathlib.Path("/tmp").glob("moref-rh-*")} - before
    assert started == set(), started
    assert "stopped the Ray head of /tmp/moref-rh-" in log
    # the job wrote its own output, every pair of the demo
    rows = pads.dataset(str(checkout / "cluster-output" / "answers"), format="parquet").to_table().to_pylist()
    assert {(r["video_id"], r["question_id"]) for r in rows} == demo_pairs()
    assert all(r["status"] == "ok" for r in rows)
    assert not any((checkout / "demo-output" / "answers").iterdir())
