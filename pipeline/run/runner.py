"""Ray wiring: the stages assembled into one streaming Ray Data pipeline.

plan (Ray tasks list the videos and attach their pending questions: pipeline/run/planning.py) ->
decode (CPU tasks) -> guidance (CLIP actors, which also stage the frames) -> answer (VLM actors)
-> answers rows (tasks) -> the driver, which commits answers and frames in files of many videos
(pipeline/store/committer.py) and counts the run summary.
The driver holds the output's lease (pipeline/store/output_lock.py) for the whole run.

Faults: a task whose worker dies is retried (Ray Data's default); Ray Data restarts a dead actor
and retries its tasks (its defaults: max_restarts=-1, max_task_retries=-1). Staged frames have
deterministic names and only the driver commits, so a retry never duplicates. Storage errors are
retried inside the stages (decode.read_retries, output.write_retries).

Stages are plain classes with one method (rows in, rows out) that declare the columns they read
and write (pipeline/run/stage_contract.py); pipeline/run/job_stages.py lists the job's stages with their
resources, and this module turns that list into Ray Data operators, after checking it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import numpy as np

from pipeline.config import JobConfig
from pipeline.run import planning
from pipeline.run.metrics import Progress, RunReport, quiet_ray_data_progress, run_progress, stage_counts
from pipeline.run.planning import Plan
from pipeline.run.quiet import quiet_ray_data_console, ray_logging_level, worker_env
from pipeline.run.resources import (
    StageRequest,
    UnschedulableError,
    check_placement,
    nodes_from_ray,
    nodes_from_shapes,
    stage_requests,
)
from pipeline.run.stage_contract import StageSpec, check_chain
from pipeline.schema import SOURCE_COLUMNS, STATUS_OK, Col
from pipeline.store.commit_log import CommitLog
from pipeline.store.committer import OutputCommitter
from pipeline.store.output_lock import OutputLease, OutputLockedError
from pipeline.store.output_store import RUNS_DIR, OutputStore

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


def plan_work(cfg: JobConfig, store: OutputStore) -> tuple[Plan, RunSummary]:
    """The videos with questions still to answer (pipeline/run/planning.py) and the summary so far.
    Starts or joins Ray as the config says when planning runs in Ray tasks."""
    run_id = cfg.resolved_run_id()
    summary = RunSummary(run_id=run_id, output=cfg.output.path)
    if not planning.plans_on_driver(cfg.input):
        _init_ray(cfg)
    plan = planning.plan_work(cfg, store)
    summary.videos, summary.inputs = plan.videos, plan.inputs
    summary.skipped_done, summary.retried_errors = plan.skipped_done, plan.retried_errors
    summary.unmatched_questions = plan.unmatched_questions
    return plan, summary


def _init_ray(cfg: JobConfig) -> bool:
    """Join the configured cluster, or start a local Ray. Returns True when Ray was local."""
    import ray

    quiet_ray_data_progress()  # before planning or the pipeline makes a dataset (pipeline/run/metrics.py)
    quiet_ray_data_console()  # Ray's own INFO lines only with --verbose (pipeline/run/quiet.py)
    if ray.is_initialized():
        return cfg.ray.address is None
    # Under `ray job submit` RAY_ADDRESS names the cluster the job runs on: join it.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        env = worker_env()  # quiet libraries on the cluster's workers too (pipeline/run/quiet.py)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None,
                 logging_level=ray_logging_level())
        return False
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True, logging_level=ray_logging_level())
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


def build_dataset(source, cfg: JobConfig, run_id: str, requests: dict[str, StageRequest], counter=None):
    """The Ray Data pipeline of the job's stages (pipeline/run/job_stages.py) over `source` (the planned
    videos, one per block: `planning.Plan.source`), checked first. `counter`: the run's StageCounter
    actor (pipeline/run/metrics.py), told what each stage call did."""
    from pipeline.run.job_stages import job_stages

    specs = job_stages(cfg, run_id, requests)
    check_chain(SOURCE_COLUMNS, specs)
    ds = source
    for spec in specs:
        ds = _map_stage(ds, spec, counter)
    return ds


def _map_stage(ds, spec: StageSpec, counter=None):
    """One stage as a Ray Data map_batches: actors for stateful stages (models), tasks otherwise."""
    from ray.data import ActorPoolStrategy

    args = {"batch_size": spec.batch_size, "batch_format": "pyarrow" if spec.batch_format == "pyarrow" else "numpy",
            **spec.request.ray_args()}
    if spec.is_actor:
        # Ray Data hands each block to the actor with the fewest tasks in flight, so with one
        # answer actor per GPU the videos spread over the GPUs as they finish. Several calls at
        # once run on threads; the stage guards its model (AnswerStage.device_lock).
        pool = ActorPoolStrategy(size=spec.request.count, max_concurrent_calls_per_actor=spec.concurrent_calls,
                                 enable_true_multi_threading=spec.concurrent_calls > 1)
        return ds.map_batches(_actor_class(spec, counter), fn_constructor_kwargs={"kwargs": dict(spec.kwargs)},
                              compute=pool, **args)
    # Named parameters only (Ray 2.60 deprecates the others): a task whose worker dies is retried
    # as Ray Data retries every task (max_retries=-1); decoding runs in an isolated child process,
    # so a file that crashes or hangs the decoder yields an error row and never kills the worker.
    return ds.map_batches(_task_function(spec, counter), fn_kwargs={"kwargs": dict(spec.kwargs)}, **args)


class _StageActor:
    """Ray Data's side of an actor stage: builds the stage once and converts batches to and from
    the stage's rows. Subclassed per stage (`_actor_class`), so Ray names actors after the stage."""

    spec: StageSpec
    counter = None

    def __init__(self, kwargs: dict):
        self.stage = self.spec.stage(**kwargs)

    def __call__(self, batch):
        return _call_stage(self.stage, batch, self.spec, self.counter)


def _actor_class(spec: StageSpec, counter=None) -> type:
    return type(spec.stage.__name__, (_StageActor,), {"spec": spec, "counter": counter})


def _task_function(spec: StageSpec, counter=None):
    def run(batch, kwargs: dict):
        return _call_stage(spec.stage(**kwargs), batch, spec, counter)

    run.__name__ = run.__qualname__ = spec.stage.__name__  # Ray names the operator and its tasks after it
    return run


def _call_stage(stage, batch, spec: StageSpec, counter=None):
    if spec.batch_format == "pyarrow":
        out = stage(batch)
        _count(counter, spec.name, out)
        return out
    rows = [{name: _plain(values[i]) for name, values in batch.items()} for i in range(len(next(iter(batch.values()))))]
    out = stage(rows)
    _count(counter, spec.name, out)
    names = list(dict.fromkeys(name for row in out for name in row)) or list(spec.writes)
    return {name: [row.get(name) for row in out] for name in names}


def _count(counter, stage: str, out) -> None:
    """Tell the run's StageCounter what this call did (not waited for: progress only)."""
    counts = stage_counts(stage, out) if counter is not None else {}
    if counts:
        counter.add.remote(counts)


def _plain(value):
    """A numpy batch cell as a stage's row holds it: strings and lists of strings as Python objects
    (numpy string arrays would come back as tensor columns), arrays as they are."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def run_job(cfg: JobConfig) -> RunSummary:
    """Run the job; the summary is also written to runs/<run_id>.json. A run that fails (e.g. the
    output storage stays down past the write retries) still writes its summary, with status
    'failed', before raising: every pair it wrote is final, a rerun does the rest."""
    start = time.perf_counter()
    # one run id for the lease, the plan and the files (resolved_run_id mints a new one per call)
    cfg = cfg.model_copy(update={"run_id": cfg.resolved_run_id()})
    store = OutputStore(cfg.output)
    lease = OutputLease(store, cfg.output.lock_ttl_s, cfg.run_id or "").acquire()  # OutputLockedError: in use
    progress = run_progress(cfg.ray.progress_interval_s)  # a first line within seconds, also while listing
    failed = True
    try:
        summary = _run_holding_lease(cfg, store, lease, start, progress)
        failed = False
        return summary
    finally:
        progress.stop(failed=failed)
        lease.release()


def _run_holding_lease(cfg: JobConfig, store: OutputStore, lease: OutputLease, start: float,
                       progress: Progress) -> RunSummary:
    CommitLog(store).recover()
    removed = store.clean_temporaries()
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    plan, summary = plan_work(cfg, store)
    log.info("planned %d videos with %d pending pairs", plan.pending_videos, plan.pending_pairs)
    progress.planned_work(plan.pending_videos, plan.pending_pairs)
    reasons: collections.Counter = collections.Counter()
    try:
        if plan.pending is not None:
            import ray

            local = _init_ray(cfg)
            cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
            # A local Ray without GPUs can never satisfy a GPU request: stages run on the CPU
            # instead of waiting forever. On a cluster GPU nodes may still be scaling up.
            requests = stage_requests(cfg, gpus_usable=not (local and not cluster_gpus), cluster_gpus=cluster_gpus)
            check_resources(cfg, requests, local)
            log.info("resources per actor: %s", {name: (r.describe(), r.count) for name, r in requests.items()})
            report = RunReport(summary.run_id, plan.pending_pairs, progress)  # metrics.py

            def count(committed) -> None:
                """The summary counts committed rows: a failed run's `processed` pairs are final."""
                statuses = committed.column(Col.STATUS).to_pylist()
                ok = statuses.count(STATUS_OK)
                summary.processed, summary.ok = summary.processed + len(statuses), summary.ok + ok
                summary.errors += len(statuses) - ok
                reasons.update(r for st, r in zip(statuses, committed.column(Col.ERROR_REASON).to_pylist())
                               if st != STATUS_OK)
                report.committed(committed)

            # rows of these pairs may exist already (retried errors, or resume off): replace them
            committer = OutputCommitter(store, summary.run_id,
                                        supersede=bool(cfg.output.retry_reasons()) or not cfg.output.resume,
                                        on_commit=count)
            dataset = build_dataset(plan.source(), cfg, summary.run_id, requests, report.counter)
            with report:
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    if lease.lost:
                        raise OutputLockedError(lease.lost)
                    committer.add(batch)
                committer.close()
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
