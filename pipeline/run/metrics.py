"""What a run reports while it runs: Prometheus metrics, and a progress line in the log.

Metrics go through `ray.util.metrics`. The Ray metrics agent of the driver's node serves them on its
metrics export port (`ray start --metrics-export-port=PORT`, then `http://NODE:PORT/metrics`), named
as below with Ray's `ray_` prefix, counters with a `_total` suffix. Each one carries a `run_id` tag.
All are recorded on the driver from the answers rows as they are committed (the committer's
`on_commit`), so they agree with the output and no stage does extra work:

  moref_pairs_planned                  gauge      (video, question) pairs this run has to do
  moref_pairs_done{status}             counter    pairs committed, by status (ok, error)
  moref_videos_done                    counter    videos whose answers are committed
  moref_errors{reason}                 counter    error rows committed, by error_reason
  moref_tokens{kind}                   counter    prompt, output, visual (the Video-LLM saw), visual_native
  moref_flops{kind}                    counter    spent (total_flops), native (total_flops_native)
  moref_flops_saved                    counter    native - spent, over the rows that have both
  moref_stage_seconds{stage}           counter    decode, guidance (once per video), prefill, generate (per pair)
  moref_stage_duration_seconds{stage}  histogram  the same seconds, one observation per video or pair

Ray exports a histogram's buckets and count exactly but its _sum from bucket midpoints; the
moref_stage_seconds counters hold the exact totals.

Progress: when stderr is not a terminal (a log file, `ray job submit`, a pod's log) Ray Data's
progress bars are turned off and a thread logs one line every `ray.progress_interval_s`, counting
the rows that reached the driver ("written": those committed):

  progress: 120/500 pairs (96 written), 24 videos, 3 errors, 1.8 pairs/s, eta 3m31s
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import STATUS_OK, Col

log = logging.getLogger("moref_index")

TOKEN_COLUMNS = {"prompt": Col.PROMPT_TOKENS, "output": Col.OUTPUT_TOKENS, "visual": Col.VISUAL_TOKENS_USED,
                 "visual_native": Col.VISUAL_TOKENS_NATIVE}
# decode and guidance run once per video and their seconds repeat on each of its rows (report.py reads
# them the same way); prefill (this row's share) and generate are per pair.
PER_VIDEO_STAGES = {"decode": Col.DECODE_S, "guidance": Col.GUIDANCE_S}
PER_PAIR_STAGES = {"prefill": Col.PREFILL_S, "generate": Col.GENERATE_S}
# seconds: from a short clip's share of a batched CLIP call to a long video's decode
DURATION_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0]


@dataclasses.dataclass
class CommitStats:
    """What one commit of answers rows adds to the metrics."""

    pairs: dict[str, int]  # by status
    videos: int
    errors: dict[str, int]  # by error_reason
    tokens: dict[str, float]  # by TOKEN_COLUMNS kind
    flops: dict[str, float]  # spent, native
    flops_saved: float
    stage_seconds: dict[str, list[float]]  # per stage: one value per video or per pair

    @classmethod
    def of(cls, rows: pa.Table) -> CommitStats:
        statuses = rows.column(Col.STATUS).to_pylist()
        pairs: dict[str, int] = {}
        errors: dict[str, int] = {}
        for status, reason in zip(statuses, rows.column(Col.ERROR_REASON).to_pylist()):
            pairs[status] = pairs.get(status, 0) + 1
            if status != STATUS_OK:
                errors[reason or "unknown"] = errors.get(reason or "unknown", 0) + 1
        spent, native = rows.column(Col.TOTAL_FLOPS), rows.column(Col.TOTAL_FLOPS_NATIVE)
        both = pc.and_(pc.is_valid(spent), pc.is_valid(native))
        saved = pc.subtract(pc.filter(native, both), pc.filter(spent, both))
        # A video's rows come to the driver together (one stage call makes them), so within a commit
        # its id is distinct from the others' and its per-video seconds are its rows' maximum.
        per_video = rows.group_by(Col.VIDEO_ID).aggregate([(c, "max") for c in PER_VIDEO_STAGES.values()])
        seconds = {stage: _values(per_video.column(f"{c}_max")) for stage, c in PER_VIDEO_STAGES.items()}
        seconds |= {stage: _values(rows.column(c)) for stage, c in PER_PAIR_STAGES.items()}
        return cls(pairs=pairs, videos=per_video.num_rows, errors=errors,
                   tokens={kind: _sum(rows.column(c)) for kind, c in TOKEN_COLUMNS.items()},
                   flops={"spent": _sum(spent), "native": _sum(native)}, flops_saved=_sum(saved),
                   stage_seconds=seconds)


def _sum(column) -> float:
    value = pc.sum(column).as_py()
    return float(value) if value is not None else 0.0


def _values(column) -> list[float]:
    return [float(v) for v in column.to_pylist() if v is not None]


class _Instruments:
    """The ray.util.metrics objects, made once per process (after ray.init): a metric name may be
    registered once, and the run_id is a tag, so every run of the process shares them."""

    _made: _Instruments | None = None

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        run = ("run_id",)
        self.planned = Gauge("moref_pairs_planned", "(video, question) pairs this run has to do", tag_keys=run)
        self.pairs = Counter("moref_pairs_done", "pairs committed, by status", tag_keys=(*run, "status"))
        self.videos = Counter("moref_videos_done", "videos whose answers are committed", tag_keys=run)
        self.errors = Counter("moref_errors", "error rows committed, by error_reason", tag_keys=(*run, "reason"))
        self.tokens = Counter("moref_tokens", "tokens of the committed answers, by kind", tag_keys=(*run, "kind"))
        self.flops = Counter("moref_flops", "forward FLOPs of the committed answers: spent, native",
                             tag_keys=(*run, "kind"))
        self.flops_saved = Counter("moref_flops_saved", "native minus spent FLOPs of the committed answers",
                                   tag_keys=run)
        self.seconds = Counter("moref_stage_seconds", "seconds per stage: decode and guidance per video, "
                               "prefill and generate per pair", tag_keys=(*run, "stage"))
        self.durations = Histogram("moref_stage_duration_seconds", "seconds per video (decode, guidance) or "
                                   "pair (prefill, generate)", boundaries=DURATION_BOUNDARIES,
                                   tag_keys=(*run, "stage"))

    @classmethod
    def get(cls) -> _Instruments:
        if cls._made is None:
            cls._made = cls()
        return cls._made


class RunMetrics:
    """The metrics of one run (module docstring); needs a connected Ray."""

    def __init__(self, run_id: str, planned_pairs: int):
        self.run_id = run_id
        self.ins = _Instruments.get()
        self.ins.planned.set(float(planned_pairs), tags={"run_id": run_id})

    def record(self, stats: CommitStats) -> None:
        ins, run = self.ins, {"run_id": self.run_id}
        _inc(ins.videos, stats.videos, run)
        _inc(ins.flops_saved, stats.flops_saved, run)
        for status, n in stats.pairs.items():
            _inc(ins.pairs, n, {**run, "status": status})
        for reason, n in stats.errors.items():
            _inc(ins.errors, n, {**run, "reason": reason})
        for kind, amount in stats.tokens.items():
            _inc(ins.tokens, amount, {**run, "kind": kind})
        for kind, amount in stats.flops.items():
            _inc(ins.flops, amount, {**run, "kind": kind})
        for stage, values in stats.stage_seconds.items():
            tags = {**run, "stage": stage}
            _inc(ins.seconds, sum(values), tags)
            for value in values:
                ins.durations.observe(value, tags=tags)


def _inc(counter, value: float, tags: dict[str, str]) -> None:
    if value > 0:  # Ray's Counter.inc refuses 0
        counter.inc(float(value), tags=tags)


def format_duration(seconds: float) -> str:
    """45s, 3m05s, 2h07m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """The progress line (module docstring): counts rows as they reach the driver and as they are
    committed; `tick` logs a line when `interval_s` has passed since the last one."""

    def __init__(self, planned_pairs: int, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None):
        self.planned, self.interval_s, self.clock = planned_pairs, interval_s, clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.pairs = self.written = self.videos = self.errors = 0
        self.start_time = self.last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def received(self, rows: pa.Table) -> None:
        statuses = rows.column(Col.STATUS).to_pylist()
        self.pairs += len(statuses)
        self.errors += len(statuses) - statuses.count(STATUS_OK)
        self.videos += len(pc.unique(rows.column(Col.VIDEO_ID)))  # a video's rows come together

    def committed(self, rows: int) -> None:
        self.written += rows

    def line(self, final: str | None = None) -> str:
        """`final`: the last line's ending, "done" or "stopped" (the run failed)."""
        elapsed = self.clock() - self.start_time
        rate = self.pairs / elapsed if elapsed > 0 else 0.0
        if final:
            tail = f"{final} after {format_duration(elapsed)}"
        elif rate > 0 and self.pairs < self.planned:
            tail = f"eta {format_duration((self.planned - self.pairs) / rate)}"
        else:
            tail = "eta ?"
        return (f"progress: {self.pairs}/{self.planned} pairs ({self.written} written), {self.videos} videos, "
                f"{self.errors} errors, {rate:.1f} pairs/s, {tail}")

    def tick(self) -> bool:
        now = self.clock()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        self.emit(self.line())
        return True

    def start(self) -> None:
        """Log from a thread, so that the line comes also while no rows arrive (models loading,
        the autoscaler adding nodes)."""
        def run() -> None:
            while not self._stop.wait(min(self.interval_s, 1.0)):
                self.tick()

        self._thread = threading.Thread(target=run, name="moref-progress", daemon=True)
        self._thread.start()

    def stop(self, failed: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.emit(self.line(final="stopped" if failed else "done"))


def quiet_ray_data_progress(interactive: bool | None = None) -> bool:
    """Off a terminal (stderr by default), Ray Data's progress bars off: in a log they are blocks of
    lines every few seconds. True when they were turned off. Datasets copy the DataContext when
    they are made, so this runs before any is (the runner calls it when it starts or joins Ray)."""
    if sys.stderr.isatty() if interactive is None else interactive:
        return False
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    return True


class RunReport:
    """The runner's one handle on metrics and progress: `committed` from the committer's on_commit,
    `received` for each batch of answers rows reaching the driver; `with report:` around the loop
    runs the progress line."""

    def __init__(self, run_id: str, planned_pairs: int, progress_interval_s: float,
                 interactive: bool | None = None):
        self.metrics = RunMetrics(run_id, planned_pairs)
        # On a terminal Ray Data's bars stay (they redraw in place); elsewhere the line replaces them.
        self.progress = Progress(planned_pairs, progress_interval_s) if quiet_ray_data_progress(interactive) else None

    def committed(self, rows: pa.Table) -> None:
        self.metrics.record(CommitStats.of(rows))
        if self.progress is not None:
            self.progress.committed(rows.num_rows)

    def received(self, rows: pa.Table) -> None:
        if self.progress is not None:
            self.progress.received(rows)

    def __enter__(self) -> RunReport:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.progress is not None:
            self.progress.stop(failed=exc_type is not None)
