"""Faults during a run, each ending with every input accounted for exactly once: worker and actor
processes killed mid-run, the object-storage server restarted mid-run, and an output that cannot be
written (the run fails, says so in its summary, and the rerun completes it)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from pipeline.config import parse_job_config
from pipeline.run.runner import run_job
from pipeline.schema import Col
from pipeline.store.output_store import OutputStore
from tests.paths import video
from tests.reliability.helpers import (
    PROMPTS,
    assert_exactly_once,
    free_port,
    job,
    job_dict,
    kill,
    my_ray_processes,
    rows_of,
    start_moto,
    stop_moto,
    wait_until,
)

pytestmark = pytest.mark.slow

CLIP = video("mpeg4_mp3.avi")  # 6.6 s, Apache-2.0


class Background:
    """run_job in a thread; `result()` re-raises its exception."""

    def __init__(self, cfg):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self.thread.start()

    def _run(self, cfg):
        try:
            self.value = run_job(cfg)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def result(self, timeout_s: float = 300):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "run did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def alive_actor(ray, class_part: str) -> tuple[str, int] | None:
    """(actor id, pid) of the live Ray Data actor whose class name contains class_part."""
    for actor_id, actor in ray._private.state.actors().items():
        if class_part in actor["ActorClassName"] and actor["State"] == "ALIVE" and actor["Pid"]:
            return actor_id, actor["Pid"]
    return None


def answers_files(out) -> list:
    return [p for p in (out / "answers").glob("*.parquet")] if (out / "answers").is_dir() else []


def test_worker_and_actors_killed_mid_run(tmp_path, ray_local):
    videos = tmp_path / "in"
    videos.mkdir()
    ids = [f"clip{i}.avi" for i in range(8)]
    for vid in ids:
        shutil.copy(CLIP, videos / vid)
    out = tmp_path / "out"
    # longer answers, so answering is still going on when its actor dies; the driver commits each
    # video as its rows arrive, so committed files show how far the run is
    data = job_dict(str(out), videos=f"{videos}/*.avi", answer={"max_new_tokens": 48}, run_id="kills",
                    output_opts={"max_videos_per_file": 1})
    data["guidance"]["videos_per_batch"] = 1  # videos reach the answer stage one by one: room to kill mid-run
    cfg = parse_job_config(data)
    run = Background(cfg)

    # a decode worker in the middle of a task (its title names the task while it runs)
    decode_pid = wait_until(lambda: my_ray_processes("ray::MapBatches(DecodeStage)"), 120, what="a decode task")[0]
    assert kill(decode_pid)
    # the guidance actor (which also stages frames) once it has staged one video's frames
    staged = out / "_staging" / "frames"
    wait_until(lambda: list(staged.glob("*.parquet")) if staged.is_dir() else [], 120,
               what="the first staged frames file")
    guide = alive_actor(ray_local, "GuideThenWriteFrames")
    assert guide, "the guidance actor was gone before it could be killed"
    guide_id, guide_pid = guide
    assert kill(guide_pid)
    # the Video-LLM actor once it has answered one video, with others still to answer
    wait_until(lambda: answers_files(out), 120, what="the first answers file")
    answer = alive_actor(ray_local, "AnswerStage")
    assert answer, "the answer actor was gone before it could be killed"
    answer_id, answer_pid = answer
    written_at_kill = len(answers_files(out))
    assert kill(answer_pid)
    assert written_at_kill < len(ids), "the run finished before the answer actor was killed"

    summary = run.result()

    expected = {(v, p["question_id"]) for v in ids for p in PROMPTS}
    rows = rows_of(cfg)
    assert_exactly_once(rows, expected)
    assert all(r["status"] == "ok" for r in rows), [r[Col.ERROR_DETAIL] for r in rows if r[Col.ERROR_DETAIL]]
    assert (summary.processed, summary.ok, summary.errors, summary.status) == (16, 16, 0, "complete")
    frames = OutputStore(cfg.output).read_frames()
    keys = list(zip(frames.column("video_id").to_pylist(), frames.column("frame_index").to_pylist()))
    assert len(keys) == len(set(keys)) and set(frames.column("video_id").to_pylist()) == set(ids)
    # Ray restarted the killed actors (Ray Data's defaults: max_restarts=-1, max_task_retries=-1)
    actors = ray_local._private.state.actors()
    assert actors[guide_id]["NumRestarts"] >= 1 and actors[answer_id]["NumRestarts"] >= 1


def test_object_storage_restarted_mid_run(s3_server, ray_local, monkeypatch):
    import s3fs

    from pipeline.run import runner

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    servers = [start_moto(port)]  # moto keeps its state in this process: a restart keeps the objects
    outage_s = 8.0  # longer than botocore's own retries of a refused connection (about 5 s)
    restart = threading.Timer(outage_s, lambda: servers.append(start_moto(port)))
    build_dataset = runner.build_dataset

    def build_then_outage(*args, **kwargs):
        # the run has listed its inputs; the server goes away before any video is read
        ds = build_dataset(*args, **kwargs)
        stop_moto(servers[-1])
        restart.start()
        return ds

    monkeypatch.setattr(runner, "build_dataset", build_then_outage)
    try:
        storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                               skip_instance_cache=True)
        bucket = "restart-test"
        fs.mkdir(bucket)
        ids = [f"clip{i}.avi" for i in range(6)]
        for vid in ids:
            fs.put_file(str(CLIP), f"{bucket}/in/{vid}")
        cfg = job(f"s3://{bucket}/out", videos=f"s3://{bucket}/in/*.avi", storage=storage, run_id="restart")

        summary = run_job(cfg)
        restart.join()
        rows = rows_of(cfg)
    finally:
        restart.cancel()
        stop_moto(servers[-1])

    assert len(servers) == 2, "the server was not restarted"
    assert_exactly_once(rows, {(v, p["question_id"]) for v in ids for p in PROMPTS})
    assert all(r["status"] == "ok" for r in rows), [r[Col.ERROR_DETAIL] for r in rows if r[Col.ERROR_DETAIL]]
    assert (summary.processed, summary.ok, summary.status) == (12, 12, "complete")
    # the reads waited the outage out (retried with backoff) instead of failing
    slowest = max(r["decode_s"] for r in rows)
    assert slowest > outage_s / 2, f"no decode spanned the {outage_s} s outage (slowest {slowest:.1f} s)"


def test_unwritable_output_fails_the_run_and_the_rerun_completes(tmp_path, ray_local):
    videos = tmp_path / "in"
    videos.mkdir()
    for i in range(3):
        shutil.copy(CLIP, videos / f"clip{i}.avi")
    out = tmp_path / "out"
    out.mkdir()
    (out / "answers").write_text("a file where the answers directory should be")  # every write fails
    cfg = job(str(out), videos=f"{videos}/*.avi", run_id="blocked", output_opts={"write_retries": 1})

    with pytest.raises(Exception, match="cannot write .*answers"):
        run_job(cfg)

    failed = json.loads((out / "runs" / "blocked.json").read_text())
    assert failed["status"] == "failed" and "after 2 attempts" in failed["failure"]
    assert failed["inputs"] == 6 and failed["processed"] < 6
    # the failure is one line without colour codes; the whole trace is in the log beside the record
    assert failed["failure"].startswith("OutputWriteError: cannot write ")
    assert "\n" not in failed["failure"] and "\x1b" not in failed["failure"]
    assert failed["trace_log"] == "runs/blocked.log"
    trace = (out / "runs" / "blocked.log").read_text()
    assert trace.startswith("Traceback") and "OutputWriteError" in trace and "\x1b" not in trace

    (out / "answers").unlink()
    summary = run_job(cfg)
    # the same run id again: a record of its own, the failed attempt's kept
    assert json.loads((out / "runs" / "blocked.json").read_text()) == failed
    again = json.loads((out / "runs" / "blocked~2.json").read_text())
    assert (again["status"], again["attempt"], again["record"], again["failure"]) == ("complete", 2, "blocked~2", None)

    expected = {(f"clip{i}.avi", p["question_id"]) for i in range(3) for p in PROMPTS}
    assert_exactly_once(rows_of(cfg), expected)
    assert (summary.skipped_done, summary.processed, summary.ok, summary.status) == (0, 6, 6, "complete")
