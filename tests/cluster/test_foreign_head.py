"""A local `moref-index run` beside another Ray on the same machine never joins it.

A foreign head is started with `ray start --head` (jobs/local_cluster.py's `LocalHead`) in
`$RAY_TMPDIR/ray`, where `ray start` records its address for any later `ray.init()` without an
address to find. The job then runs from the command line with that RAY_TMPDIR (and the head's auth
token, so joining would work if it were tried), no RAY_ADDRESS, and no `ray.num_cpus`: it must
start a Ray of its own and finish, and the head must never see its driver.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow.dataset as pads
import pytest
import yaml

from jobs.local_cluster import START_ATTEMPTS, TOKEN_FILE, HeadError, LocalHead
from tests.cluster.test_job_submit import logs_on_failure
from tests.paths import DEMO_VIDEOS, REPO

JOB_TIMEOUT_S = 300


@pytest.fixture
def foreign_head():
    """A head whose address file sits where a plain `ray.init()` with RAY_TMPDIR=`parent` looks:
    `parent`/ray/ray_current_cluster. Yields (head, parent)."""
    started = []
    try:
        for _ in range(START_ATTEMPTS):
            head = LocalHead.new()
            parent = head.temp_dir  # short, under /tmp, holding the head's token
            head.temp_dir = parent / "ray"
            head.temp_dir.mkdir()
            (head.temp_dir / TOKEN_FILE).write_bytes((parent / TOKEN_FILE).read_bytes())
            started.append((head, parent))
            try:
                head.start(num_cpus=2)
                break
            except HeadError:
                print(head.logs())
                head.stop()
        else:
            pytest.fail("ray start --head failed; its output and logs are above")
        assert (head.temp_dir / "ray_current_cluster").is_file()
        yield head, parent
    finally:
        for head, parent in started:
            head.stop()
            shutil.rmtree(parent, ignore_errors=True)


def test_local_run_starts_its_own_ray_beside_a_foreign_head(foreign_head, tiny_model_dir, tmp_path):
    head, ray_tmpdir = foreign_head
    video = tmp_path / "videos" / "kinetics_armwrestling.mp4"
    video.parent.mkdir()
    shutil.copy(DEMO_VIDEOS / video.name, video)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"videos": str(video.parent / "*.mp4")},
        "questions": {"prompts": [{"question_id": "caption", "question": "Describe this video."}]},
        "decode": {"num_frames": 4, "frame_size": 64, "num_cpus": 0.5, "timeout_s": 120},
        "guidance": {"model": tiny_model_dir["clip"], "pretrained": None, "frames_per_question": 4,
                     "num_cpus": 0.25, "num_gpus": 0},
        "answer": {"model": tiny_model_dir["llava"], "max_new_tokens": 2, "num_cpus": 0.5, "num_gpus": 0},
        "output": {"path": str(tmp_path / "out")},
        # no ray.num_cpus: a joined foreign head used to leave the job waiting for resources
    }))
    env = {**head.env(), "RAY_TMPDIR": str(ray_tmpdir)}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(config)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    with logs_on_failure(head):
        assert job.returncode == 0, log[-6000:]
        rows = pads.dataset(str(tmp_path / "out" / "answers"), format="parquet").to_table().to_pylist()
        assert [(r["video_id"], r["question_id"], r["status"]) for r in rows] == [(video.name, "caption", "ok")]
        # A driver that connects to a head leaves its core-driver log in that head's session.
        logs = head.temp_dir / "session_latest" / "logs"
        assert logs.is_dir()
        joined = [p.name for p in logs.iterdir() if p.name.endswith(f"_{job.pid}.log")]
        assert not joined, f"the job joined the foreign head: {joined}"
