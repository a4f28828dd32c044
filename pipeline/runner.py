"""Ray wiring: the stages assembled into one streaming Ray Data pipeline.

list videos + questions -> resume filter -> decode (CPU tasks) -> guidance (CLIP actors, which
also write the frames table) -> answer (VLM actors) -> answers sink (tasks) -> run summary.

Faults: a decode task whose worker dies is retried (`max_retries`); Ray Data restarts a dead actor
and retries its tasks (its defaults: max_restarts=-1, max_task_retries=-1). Output file names are
deterministic, so a retried write replaces, never duplicates. Storage errors are retried inside the
stages (decode.read_retries, output.write_retries).

Stages are plain classes (pipeline/decode/stage.py, guidance.py, answer.py, sink.py); this module only
decides where and with what resources they run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import numpy as np

from pipeline.config import JobConfig
from pipeline.resources import (
    StageRequest,
    UnschedulableError,
    check_placement,
    nodes_from_ray,
    nodes_from_shapes,
    stage_requests,
)
from pipeline.schema import STATUS_OK, Col
from pipeline.sink import RUNS_DIR, AnswersWriter, FramesWriter, OutputStore
from pipeline.sources import list_videos, load_questions, questions_for

log = logging.getLogger("moref_index")


@dataclasses.dataclass
class RunSummary:
    run_id: str
    output: str
    videos: int = 0
    inputs: int = 0  # (video, question) pairs in the job
    skipped_done: int = 0  # pairs already in the answers table (resume)
    retried_errors: int = 0  # pairs whose error row is redone (output.retry_errors); replaced, not added
    processed: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    unmatched_questions: int = 0  # questions whose video_id matches no listed video (not inputs)
    elapsed_s: float = 0.0
    questions_per_s: float = 0.0  # (video, question) pairs processed per second of the whole run
    status: str = "complete"  # or "failed": the run stopped early; `failure` says why; rerun to resume
    failure: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def render(self) -> str:
        lines = [
            f"run {self.run_id}: {self.videos} videos, {self.inputs} (video, question) pairs",
            f"  answered ok: {self.ok}   errors: {self.errors}   skipped (already done): {self.skipped_done}"
            + (f"   errors retried: {self.retried_errors}" if self.retried_errors else ""),
        ]
        for reason, count in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason}: {count}")
        if self.unmatched_questions:
            lines.append(f"  questions naming no listed video (not run): {self.unmatched_questions}")
        lines.append(f"  output: {self.output}/answers and {self.output}/frames  ({self.elapsed_s:.1f} s, "
                     f"{self.questions_per_s:.2f} questions/s)")
        if self.status != "complete":
            lines.append(f"  RUN FAILED after {self.processed} pairs (rerun to resume): {self.failure}")
        return "\n".join(lines)


def plan_work(cfg: JobConfig, store: OutputStore) -> tuple[list[dict], RunSummary]:
    """One row per video with the questions still to answer, and the summary so far."""
    run_id = cfg.resolved_run_id()
    summary = RunSummary(run_id=run_id, output=cfg.output.path)
    videos = list_videos(cfg.input)
    per_video, prompts = load_questions(cfg.questions, cfg.input.storage)
    done: set[tuple[str, str]] = set()
    retry: set[tuple[str, str]] = set()
    if cfg.output.resume:
        reasons = cfg.output.retry_reasons()
        for pair, (status, reason) in store.answer_status().items():
            if status != STATUS_OK and reason in reasons:
                retry.add(pair)
            else:
                done.add(pair)
    listed = {v.video_id for v in videos}
    unmatched = {vid: len(qs) for vid, qs in per_video.items() if vid not in listed}
    summary.unmatched_questions = sum(unmatched.values())
    if unmatched:
        log.warning("%d questions name %d video_ids that match no listed video, e.g. %s",
                    summary.unmatched_questions, len(unmatched), sorted(unmatched)[:3])
    rows = []
    for video in videos:
        questions = questions_for(video.video_id, per_video, prompts)
        summary.inputs += len(questions)
        todo = [q for q in questions if (video.video_id, q.question_id) not in done]
        summary.skipped_done += len(questions) - len(todo)
        summary.retried_errors += sum((video.video_id, q.question_id) in retry for q in todo)
        if questions:
            summary.videos += 1
        if todo:
            rows.append(
                {
                    Col.VIDEO_ID: video.video_id,
                    Col.VIDEO_URI: video.video_uri,
                    Col.SIZE_BYTES: video.size_bytes if video.size_bytes is not None else -1,
                    Col.QUESTION_IDS: [q.question_id for q in todo],
                    Col.QUESTIONS: [q.question for q in todo],
                }
            )
    return rows, summary


def _init_ray(cfg: JobConfig) -> bool:
    """Join the configured cluster, or start a local Ray. Returns True when Ray was local."""
    import ray

    if ray.is_initialized():
        return cfg.ray.address is None
    # Under `ray job submit` RAY_ADDRESS names the cluster the job runs on: join it.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def check_resources(cfg: JobConfig, requests: dict[str, StageRequest], local: bool) -> None:
    """Fail before any work when the stages' requests can never be scheduled. Checked against
    `ray.node_shapes` when given; else against the live nodes: strictly on a local Ray, as a warning
    on a joined cluster (its autoscaler may add nodes the check cannot see)."""
    import ray

    if cfg.ray.node_shapes:
        check_placement(requests, nodes_from_shapes(cfg.ray.node_shapes, requests), "ray.node_shapes")
        return
    where = "the local Ray" if local else "the cluster's current nodes"
    try:
        check_placement(requests, nodes_from_ray(ray.nodes()), where)
    except UnschedulableError as exc:
        if local:
            raise
        log.warning("%s; waiting for the autoscaler (set ray.node_shapes to check against the nodes it can add)", exc)


def _decode_row(row: dict, cfg, storage) -> dict:
    from pipeline.decode import DecodeStage

    # Options for this video's own protocol: an archive may mix local paths and object stores.
    uri = row[Col.VIDEO_URI]
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return DecodeStage(cfg, storage.fsspec_options(protocol))(row)


class _GuideThenWriteFrames:
    """The guidance actor: several videos per call (`guidance.videos_per_batch`), so the image
    tower runs over all their frames in large batches; it also writes each video's frames table.
    As a task of its own the writer would start worker processes that import torch (for
    `frames_table`) only to write a Parquet file: tens of seconds per worker on a small machine,
    and one more copy of every video's frames through the object store."""

    def __init__(self, cfg, output):
        from pipeline.guidance import GuidanceStage

        self.guide = GuidanceStage(cfg)
        self.write = FramesWriter(output)

    def __call__(self, batch: dict) -> dict:
        outs = [self.write(out) for out in self.guide.guide_rows(_rows(batch))]
        names = list(dict.fromkeys(name for out in outs for name in out))
        return {name: [out.get(name) for out in outs] for name in names}


class _GuideThenAnswer:
    """`guidance.placement: answer_actor`: one actor per GPU runs CLIP and the Video-LLM. CLIP
    takes the answer stage's device lock, so it never competes with the Video-LLM for the GPU;
    with several videos in flight one video's CLIP pass waits while another is answered."""

    def __init__(self, guidance, output, answer, run_id: str):
        from pipeline.answer import AnswerStage
        from pipeline.guidance import GuidanceStage

        self.answer = AnswerStage(answer, run_id)
        self.guide = GuidanceStage(guidance)
        self.write = FramesWriter(output)

    def __call__(self, batch: dict) -> dict:
        rows = _rows(batch)
        with self.answer.device_lock:
            guided = self.guide.guide_rows(rows)
        return self.answer.answer_rows([self.write(row) for row in guided])


def _rows(batch: dict) -> list[dict]:
    return [{name: _plain(values[i]) for name, values in batch.items()} for i in range(len(batch[Col.VIDEO_ID]))]


def _plain(value):
    """A numpy batch cell as the row path hands it over: strings and lists of strings as Python
    objects (numpy string arrays would come back as tensor columns), arrays as they are."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_answers(batch, output, run_id: str, supersede: bool):
    return AnswersWriter(output, run_id, supersede)(batch)


def build_dataset(rows: list[dict], cfg: JobConfig, run_id: str, requests: dict[str, StageRequest]):
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.answer import AnswerStage

    guidance, answer = requests["guidance"], requests["answer"]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one video per block
    ds = ds.map(
        _decode_row,
        fn_kwargs={"cfg": cfg.decode, "storage": cfg.input.storage},
        num_cpus=requests["decode"].cpus,
        max_retries=2,
    )
    # Several videos in flight per answer actor, each call on its own thread; the stage's device
    # lock keeps one on the model at a time (pipeline/answer.py).
    in_flight = cfg.answer.videos_in_flight
    answer_pool = ActorPoolStrategy(size=answer.count, max_concurrent_calls_per_actor=in_flight,
                                    enable_true_multi_threading=in_flight > 1)
    if cfg.guidance.placement == "answer_actor":
        return _then_write_answers(ds.map_batches(
            _GuideThenAnswer,
            fn_constructor_kwargs={"guidance": cfg.guidance, "output": cfg.output, "answer": cfg.answer,
                                   "run_id": run_id},
            batch_size=1,
            batch_format="numpy",
            compute=answer_pool,
            **answer.ray_args(),
        ), cfg, run_id, requests)
    ds = ds.map_batches(
        _GuideThenWriteFrames,
        fn_constructor_kwargs={"cfg": cfg.guidance, "output": cfg.output},
        batch_size=cfg.guidance.videos_per_batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=guidance.count),
        **guidance.ray_args(),
    )
    ds = ds.map_batches(
        AnswerStage,
        fn_constructor_kwargs={"cfg": cfg.answer, "run_id": run_id},
        batch_size=1,
        batch_format="numpy",
        # Ray Data hands each block to the actor with the fewest tasks in flight, so with one actor
        # per GPU the videos spread over the GPUs as they finish.
        compute=answer_pool,
        **answer.ray_args(),
    )
    return _then_write_answers(ds, cfg, run_id, requests)


def _then_write_answers(ds, cfg: JobConfig, run_id: str, requests: dict[str, StageRequest]):
    ds = ds.map_batches(
        _write_answers,
        # rows of these pairs may exist already (retried errors, or resume off): replace them
        fn_kwargs={"output": cfg.output, "run_id": run_id,
                   "supersede": bool(cfg.output.retry_reasons()) or not cfg.output.resume},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=requests["sink"].cpus,
    )
    return ds


def run_job(cfg: JobConfig) -> RunSummary:
    """Run the job; the summary is also written to runs/<run_id>.json. A run that fails (e.g. the
    output storage stays down past the write retries) still writes its summary, with status
    'failed', before raising: every pair it wrote is final, a rerun does the rest."""
    start = time.perf_counter()
    store = OutputStore(cfg.output)
    removed = store.clean_temporaries()
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    rows, summary = plan_work(cfg, store)
    log.info("planned %d videos with %d pending pairs", len(rows), summary.inputs - summary.skipped_done)
    reasons: collections.Counter = collections.Counter()
    try:
        if rows:
            import ray

            local = _init_ray(cfg)
            cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
            # A local Ray without GPUs can never satisfy a GPU request: stages run on the CPU
            # instead of waiting forever. On a cluster GPU nodes may still be scaling up.
            requests = stage_requests(cfg, gpus_usable=not (local and not cluster_gpus), cluster_gpus=cluster_gpus)
            check_resources(cfg, requests, local)
            log.info("resources per actor: %s", {name: (r.describe(), r.count) for name, r in requests.items()})
            for out in build_dataset(rows, cfg, summary.run_id, requests).iter_rows():
                summary.processed += 1
                if out[Col.STATUS] == STATUS_OK:
                    summary.ok += 1
                else:
                    summary.errors += 1
                    reasons[out[Col.ERROR_REASON]] += 1
    except BaseException as exc:
        summary.status = "failed"
        summary.failure = f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        summary.errors_by_reason = dict(reasons)
        summary.elapsed_s = round(time.perf_counter() - start, 3)
        summary.questions_per_s = round(summary.processed / summary.elapsed_s, 3) if summary.elapsed_s else 0.0
        try:
            store.write_json(summary.to_dict(), RUNS_DIR, f"{summary.run_id}.json")
        except Exception:  # noqa: BLE001 - never hide the run's own error behind this one
            if summary.status == "complete":
                raise
            log.exception("could not write the run summary")
    return summary
