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

import atexit
import collections
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
import traceback

import numpy as np

from pipeline.config import ConfigError, JobConfig
from pipeline.run import planning
from pipeline.run.metrics import Progress, RunReport, quiet_ray_data_progress, run_progress, stage_counts
from pipeline.run.planning import Plan
from pipeline.run.preflight import check_before_work
from pipeline.run.quiet import quiet_ray_data_console, ray_logging_level, worker_env
from pipeline.run.resources import (
    ClusterGPUs,
    UnschedulableError,
    check_placement,
    nodes_from_ray,
    nodes_from_shapes,
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
    gpus: float = 0.0  # GPUs of the cluster when the run started (plan's GPU-hour estimate)
    changed: int = 0  # written pairs asked again: their fingerprint changed (output.redo_changed); replaced
    processed: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    unmatched_questions: int = 0  # questions whose video_id matches no listed video (not inputs)
    unmatched_examples: list = dataclasses.field(default_factory=list)  # the first few, as [video_id, question_id]
    elapsed_s: float = 0.0
    questions_per_s: float = 0.0  # (video, question) pairs processed per second of the whole run
    status: str = "complete"  # or "failed": the run stopped early; `failure` says why; rerun to resume
    failure: str | None = None  # one line; the whole trace is in `trace_log`
    trace_log: str | None = None  # runs/<record>.log under the output, beside this record
    record: str | None = None  # this attempt's record: runs/<run_id>.json, or <run_id>~N.json for the Nth
    attempt: int = 1  # runs under this run id so far, this one included

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def render(self) -> str:
        lines = [
            f"run {self.run_id}: {self.videos} videos, {self.inputs} (video, question) pairs",
            f"  answered ok: {self.ok}   errors: {self.errors}   skipped (already done): {self.skipped_done}"
            + (f"   errors retried: {self.retried_errors}" if self.retried_errors else "")
            + (f"   redone (changed since written): {self.changed}" if self.changed else ""),
        ]
        for reason, count in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason}: {count}")
        if self.unmatched_questions:
            named = ", ".join(f"{v}/{q}" for v, q in self.unmatched_examples)
            more = ", ..." if self.unmatched_questions > len(self.unmatched_examples) else ""
            lines.append(f"  questions naming no listed video (not run): {self.unmatched_questions} ({named}{more})")
        lines.append(f"  output: {self.output}/answers and {self.output}/frames  ({self.elapsed_s:.1f} s, "
                     f"{self.questions_per_s:.2f} questions/s)")
        if self.status != "complete":
            lines.append(f"  RUN FAILED after {self.processed} pairs (rerun to resume): {self.failure}")
        return "\n".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour and cursor codes (Ray colours its errors)
FAILURE_CHARS = 500
COUNT_TIMEOUT_S = 10.0  # a stage batch waits at most this for the progress counter


def one_line(exc: BaseException) -> str:
    """A failure as one line for the run record: the innermost cause Ray wraps (a task's or an
    actor's own exception), its type and the first line of its message, without colour codes."""
    inner = exc
    while isinstance(getattr(inner, "cause", None), BaseException):  # RayTaskError and friends
        inner = inner.cause  # type: ignore[attr-defined]
    lines = [line.strip() for line in _ANSI.sub("", str(inner)).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"[:FAILURE_CHARS]


def _record_name(store: OutputStore, run_id: str) -> tuple[str, int]:
    """This attempt's run record, without a suffix: runs/<run_id>.json for a run id's first attempt,
    <run_id>~2.json for its second and so on ('~' never occurs in a run id): a repeated run id keeps
    every attempt's record. Chosen holding the output's lease, so no other run picks the same."""
    name, attempt = run_id, 1
    while store.fs.exists(store.path(RUNS_DIR, f"{name}.json")):
        attempt += 1
        name = f"{run_id}~{attempt}"
    return name, attempt


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
    summary.changed = plan.changed_pairs
    summary.unmatched_questions = plan.unmatched_questions
    summary.unmatched_examples = [list(pair) for pair in plan.unmatched_examples]
    return plan, summary


def _init_ray(cfg: JobConfig) -> bool:
    """Join the configured cluster, or start a local Ray of this job's own. Returns True when Ray
    was local.

    Only an explicit address joins a cluster (`ray.address`, or RAY_ADDRESS as `ray job submit`
    sets it). Otherwise Ray is started here with address "local" and a temp dir of its own: plain
    `ray.init()` would join whatever head the last `ray start` on this machine recorded in Ray's
    temp dir (another user's job, or a dead head's leftover address file)."""
    import ray

    quiet_ray_data_progress()  # before planning or the pipeline makes a dataset (pipeline/run/metrics.py)
    quiet_ray_data_console()  # Ray's own INFO lines only with --verbose (pipeline/run/quiet.py)
    if ray.is_initialized():
        return not joins_cluster(cfg)
    address = joins_cluster(cfg)
    if address:
        env = worker_env()  # quiet libraries on the cluster's workers too (pipeline/run/quiet.py)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None,
                 logging_level=ray_logging_level())
        return False
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True,
             _temp_dir=_own_ray_temp_dir(), logging_level=ray_logging_level())
    return True


def joins_cluster(cfg: JobConfig) -> str | None:
    """The address of the cluster the job joins (`ray.address`, else $RAY_ADDRESS); None: a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def _own_ray_temp_dir() -> str:
    """A fresh temp dir for a local Ray, removed when this process exits (after Ray's own exit
    handler has stopped it: atexit runs handlers in reverse order). Short, under the system temp
    dir Ray itself would use: Ray's Unix socket paths live under it and have a length limit."""
    from ray._common.utils import get_default_system_temp_dir

    path = tempfile.mkdtemp(prefix="moref-ray-", dir=get_default_system_temp_dir())
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def check_resources(cfg: JobConfig, specs: list[StageSpec], local: bool) -> None:
    """Fail before any work when the stages' requests can never be scheduled. Checked against
    `ray.node_shapes` when given; else against the live nodes: strictly on a local Ray, as a warning
    on a joined cluster (its autoscaler may add nodes the check cannot see)."""
    import ray

    requests = [spec.request for spec in specs]
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


def build_dataset(source, specs: list[StageSpec], counter=None):
    """The Ray Data pipeline of the job's stages (pipeline/run/job_stages.py) over `source` (the planned
    videos, one per block: `planning.Plan.source`), checked first. `counter`: the run's StageCounter
    actor (pipeline/run/metrics.py), told what each stage call did."""
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
        return ds.map_batches(_actor_class(spec, counter), compute=pool, **args)
    # Named parameters only (Ray 2.60 deprecates the others): a task whose worker dies is retried
    # as Ray Data retries every task (max_retries=-1); decoding runs in an isolated child process,
    # so a file that crashes or hangs the decoder yields an error row and never kills the worker.
    return ds.map_batches(_task_function(spec, counter), **args)


class _StageActor:
    """Ray Data's side of an actor stage: builds the stage once and converts batches to and from
    the stage's rows. Subclassed per stage (`_actor_class`), so Ray names actors after the stage."""

    spec: StageSpec
    counter = None

    def __init__(self):
        self.stage = self.spec.construct()

    def __call__(self, batch):
        return _call_stage(self.stage, batch, self.spec, self.counter)


def _actor_class(spec: StageSpec, counter=None) -> type:
    return type(spec.stage.__name__, (_StageActor,), {"spec": spec, "counter": counter})


def _task_function(spec: StageSpec, counter=None):
    def run(batch):
        return _call_stage(spec.construct(), batch, spec, counter)

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
    """Tell the run's StageCounter what this call did, and wait for it to be counted (one actor call,
    milliseconds a batch): the run's last progress line reads the counter once the last batch is
    out, so every batch's counts must be in by then. A counter that does not answer costs only the
    progress numbers, never the batch."""
    counts = stage_counts(stage, out) if counter is not None else {}
    if counts:
        import ray

        try:
            ray.get(counter.add.remote(counts), timeout=COUNT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - progress only
            log.debug("stage counts not added: %s", exc)


def _plain(value):
    """A numpy batch cell as a stage's row holds it: strings and lists of strings as Python objects
    (numpy string arrays would come back as tensor columns), arrays as they are."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def run_job(cfg: JobConfig) -> RunSummary:
    """Run the job; the summary is also written to runs/<run_id>.json (runs/<run_id>~N.json for the
    Nth attempt under the same run id). A run that fails (e.g. the output storage stays down past
    the write retries) still writes its summary, with status 'failed' and a one-line failure, and
    the whole trace to the .log beside it, before raising: every pair it wrote is final, a rerun
    does the rest."""
    start = time.perf_counter()
    # one run id for the lease, the plan and the files (resolved_run_id mints a new one per call)
    cfg = cfg.model_copy(update={"run_id": cfg.resolved_run_id()})
    check_before_work(cfg, local=not joins_cluster(cfg))  # ConfigError naming the key, before any work
    store = OutputStore(cfg.output)
    lease = OutputLease(store, cfg.output.lock_ttl_s, cfg.run_id or "").acquire()  # OutputLockedError: in use
    progress = run_progress(cfg.ray.progress_interval_s)  # a first line within seconds, also while listing
    failed, mistake = True, False
    try:
        summary = _run_holding_lease(cfg, store, lease, start, progress)
        failed = False
        return summary
    except ConfigError:
        mistake = True  # found once the config met its inputs: the CLI prints it as one line
        raise
    finally:
        progress.stop(failed=failed, final_line=not mistake)
        lease.release()


def _run_holding_lease(cfg: JobConfig, store: OutputStore, lease: OutputLease, start: float,
                       progress: Progress) -> RunSummary:
    CommitLog(store).recover()
    removed = store.clean_temporaries()
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    plan, summary = plan_work(cfg, store)
    summary.record, summary.attempt = _record_name(store, summary.run_id)
    log.info("planned %d videos with %d pending pairs", plan.pending_videos, plan.pending_pairs)
    log.info("%s", cfg.frame_plan().describe())
    progress.planned_work(plan.pending_videos, plan.pending_pairs)
    reasons: collections.Counter = collections.Counter()
    try:
        if plan.pending is not None:
            import ray

            local = _init_ray(cfg)
            cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
            summary.gpus = cluster_gpus
            # job_stages imports the model stages (torch): only once there is work to do
            from pipeline.run.job_stages import job_stages

            specs = job_stages(cfg, summary.run_id, ClusterGPUs(usable=not (local and not cluster_gpus),
                                                                total=cluster_gpus))
            check_resources(cfg, specs, local)
            log.info("resources per actor: %s", {s.name: (s.request.describe(), s.request.count) for s in specs})
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

            # rows of these pairs may exist already (retried errors, changed pairs, or resume off): replace them
            supersede = bool(cfg.output.retry_reasons()) or not cfg.output.resume or plan.changed_pairs > 0
            committer = OutputCommitter(store, summary.run_id, supersede=supersede, on_commit=count)
            dataset = build_dataset(plan.source(), specs, report.counter)
            with report:
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    if lease.lost:
                        raise OutputLockedError(lease.lost)
                    committer.add(batch)
                committer.close()
    except BaseException as exc:
        summary.status = "failed"
        summary.failure = one_line(exc)
        try:
            trace = _ANSI.sub("", "".join(traceback.format_exception(exc)))
            store.write_bytes(trace.encode(), RUNS_DIR, f"{summary.record}.log")
            summary.trace_log = f"{RUNS_DIR}/{summary.record}.log"
        except Exception:  # noqa: BLE001 - never hide the run's own error behind this one
            log.exception("could not write the run's trace")
        raise
    finally:
        summary.errors_by_reason = dict(reasons)
        summary.elapsed_s = round(time.perf_counter() - start, 3)
        summary.questions_per_s = round(summary.processed / summary.elapsed_s, 3) if summary.elapsed_s else 0.0
        try:
            store.write_json(summary.to_dict(), RUNS_DIR, f"{summary.record}.json")
        except Exception:  # noqa: BLE001 - never hide the run's own error behind this one
            if summary.status == "complete":
                raise
            log.exception("could not write the run summary")
    return summary
