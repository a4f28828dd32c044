"""`moref-index plan`: what a run of a job would do, without doing it.

The same steps a run takes before any work (pipeline/run/runner.py): the checks against the
inputs, the frame plan, planning (videos listed, pairs pending, skipped as done, redone because
they changed or errored), and the stages' resource check against the cluster the run would use.
It takes no lease and writes nothing to the output. The estimate of GPU-hours uses the last
recorded run's throughput (pairs per second over its whole run, on the GPUs it had).
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.config import JobConfig
from pipeline.run.preflight import check_before_work, is_path_like, local_model_family
from pipeline.run.resources import ClusterGPUs, UnschedulableError
from pipeline.store.output_store import OutputStore


@dataclasses.dataclass
class ModelResolution:
    key: str
    value: str
    resolved: str  # where it loads from, and what it is


@dataclasses.dataclass
class JobPreview:
    output: str
    frames: str
    models: list[ModelResolution]
    videos: int
    pairs: int
    pending_videos: int
    pending_pairs: int
    skipped_done: int
    retried_errors: int
    changed_pairs: int
    unmatched_questions: int
    resources: list[str]  # one line per stage, or why the stages cannot be placed
    placeable: bool
    estimate: str  # GPU-hours from the last run's throughput, or why there is none

    def render(self) -> str:
        lines = [f"plan for {self.output} (nothing was run)",
                 f"  {self.videos} videos, {self.pairs} (video, question) pairs",
                 f"  pending: {self.pending_pairs} pairs of {self.pending_videos} videos",
                 f"    of which changed since written (asked again): {self.changed_pairs}",
                 f"    of which errors retried: {self.retried_errors}",
                 f"  skipped (already done): {self.skipped_done}"]
        if self.unmatched_questions:
            lines.append(f"  questions naming no listed video (not run): {self.unmatched_questions}")
        lines.append(f"  {self.frames}")
        lines += [f"  {m.key}: {m.value} -> {m.resolved}" for m in self.models]
        lines.append("  resources: " + ("placeable" if self.placeable else "CANNOT BE PLACED"))
        lines += [f"    {line}" for line in self.resources]
        lines.append(f"  estimate: {self.estimate}")
        return "\n".join(lines)


def preview_job(cfg: JobConfig) -> JobPreview:
    """What `run_job(cfg)` would do now. ConfigError (naming the key) as the run would raise it."""
    import ray

    from pipeline.run import planning
    from pipeline.run.job_stages import job_stages
    from pipeline.run.runner import _init_ray, check_resources, joins_cluster

    check_before_work(cfg, local=not joins_cluster(cfg))
    frames = cfg.frame_plan().describe()
    store = OutputStore(cfg.output)
    local = _init_ray(cfg)
    plan = planning.plan_work(cfg, store)
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    specs = job_stages(cfg, "plan", ClusterGPUs(usable=not (local and not cluster_gpus), total=cluster_gpus))
    resources = [f"{s.name}: {s.request.count if s.is_actor else 'tasks'} x {s.request.describe()}" for s in specs]
    try:
        check_resources(cfg, specs, local)
        placeable = True
    except UnschedulableError as exc:
        placeable, resources = False, [str(exc)]
    return JobPreview(
        output=cfg.output.path, frames=frames,
        models=[_resolve_model("answer.model", cfg.answer.model), _resolve_model("guidance.model", cfg.guidance.model)],
        videos=plan.videos, pairs=plan.inputs, pending_videos=plan.pending_videos, pending_pairs=plan.pending_pairs,
        skipped_done=plan.skipped_done, retried_errors=plan.retried_errors, changed_pairs=plan.changed_pairs,
        unmatched_questions=plan.unmatched_questions, resources=resources, placeable=placeable,
        estimate=_estimate(store, plan.pending_pairs))


def _resolve_model(key: str, value: str) -> ModelResolution:
    """A local folder (with its family, for the Video-LLM), or a hub id / open_clip name as loaded."""
    if not is_path_like(value):
        return ModelResolution(key, value, "hub id or built-in name (downloaded or read from the HF cache)")
    path = os.path.expanduser(value.removeprefix("local-dir:"))
    if key == "answer.model" and os.path.isfile(os.path.join(path, "config.json")):
        family = local_model_family(value) or "no supported family"
        return ModelResolution(key, value, f"local folder {path} ({family})")
    return ModelResolution(key, value, f"local folder {path}")


def _estimate(store: OutputStore, pending_pairs: int) -> str:
    if not pending_pairs:
        return "nothing to do"
    if not store.fs.exists(store.path()):
        return "no earlier run to take a throughput from"
    runs = [r for r in store.run_records() if int(r.get("processed") or 0) > 0 and float(r.get("elapsed_s") or 0) > 0]
    if not runs:
        return "no earlier run to take a throughput from"
    last = runs[-1]
    rate = int(last["processed"]) / float(last["elapsed_s"])  # pairs per second of the whole run
    hours = pending_pairs / rate / 3600
    gpus = float(last.get("gpus") or 0)
    spend = f"{hours * gpus:.2f} GPU-hours ({gpus:g} GPUs)" if gpus else "on CPUs"
    return (f"{hours:.2f} h at run {last.get('run_id')}'s {rate:.2f} pairs/s: {spend}")
