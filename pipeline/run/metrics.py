"""What a run reports while it runs: Prometheus metrics, and a progress line in the log.

Metrics go through `ray.util.metrics`. The Ray metrics agent of the driver's node serves them on its
metrics export port (`ray start --metrics-export-port=PORT`, then `http://NODE:PORT/metrics`), named
as below with Ray's `ray_` prefix, counters with a `_total` suffix. Each one carries a `run_id` tag.
All but moref_progress are recorded on the driver from the answers rows as they are committed (the
committer's `on_commit`), so they agree with the output and no stage does extra work:

  moref_pairs_planned                  gauge      (video, question) pairs this run has to do
  moref_pairs_done{status}             counter    pairs committed, by status (ok, error)
  moref_videos_done                    counter    videos whose answers are committed
  moref_errors{reason}                 counter    error rows committed, by error_reason
  moref_tokens{kind}                   counter    prompt, output, visual (the Video-LLM saw), visual_native
  moref_flops{kind}                    counter    spent (total_flops), native (total_flops_native)
  moref_flops_saved                    counter    native - spent, over the rows that have both
  moref_stage_seconds{stage}           counter    decode, guidance (once per video), prefill, generate (per pair)
  moref_stage_duration_seconds{stage}  histogram  the same seconds, one observation per video or pair
  moref_progress{step}                 gauge      the progress line's counts (below), set as it is written

Ray exports a histogram's buckets and count exactly but its _sum from bucket midpoints; the
moref_stage_seconds counters hold the exact totals.

Progress: when stderr is not a terminal (a log file, `ray job submit`, a pod's log) Ray Data's
progress bars are turned off and a thread logs a line `FIRST_LINE_S` after the run starts (while
videos are still being listed), then every `ray.progress_interval_s`, with what each step has done:

  progress: listed 24 videos (96 pairs); decoded 20, embedded 18 videos; answered 40/96 pairs,
  committed 32; 3 errors; 0.9 pairs/s, eta 1m02s

(one line in the log). listed: the videos with pending pairs, known once planning is done;
decoded and embedded: videos through decode and guidance; answered: pairs out of the Video-LLM
stage (ok or error); committed: pairs written to the output. The stages report their counts from
the workers to a small actor (`StageCounter`) the driver reads each line, so they move while
rows are still on their way to the driver; a task Ray retries counts again. The ETA divides the
pairs still to answer by the answered pairs per second since the pipeline started (after
planning). The same counts are the `moref_progress` gauge, tagged by step, set by the driver.
"""

from __future__ import annotations

import dataclasses
import functools
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
FIRST_LINE_S = 5.0  # the first progress line, even when nothing is done yet
PERIODIC_READ_TIMEOUT_S = 10.0  # a progress line's read of the stage counter (a missed one only delays)
FINAL_READ_TIMEOUT_S = 60.0  # the last line's read, never redone
STEPS = ("listed", "decoded", "embedded", "answered", "committed")
# What each stage's output counts toward (pipeline/run/job_stages.py names the stages): videos
# (distinct video ids of the rows out) or pairs (rows out).
STAGE_STEPS: dict[str, tuple[tuple[str, str], ...]] = {
    "decode": (("decoded", "videos"),),
    "guidance": (("embedded", "videos"),),
    "answer": (("answered", "pairs"),),
    "guidance_and_answer": (("embedded", "videos"), ("answered", "pairs")),
}
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
        self.progress = Gauge("moref_progress", "the progress line's counts: videos listed, decoded, embedded; "
                              "pairs answered, committed", tag_keys=(*run, "step"))

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


    def progress(self, counts: dict[str, int]) -> None:
        for step, n in counts.items():
            self.ins.progress.set(float(n), tags={"run_id": self.run_id, "step": step})


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


class StageCounter:
    """What the stages have done (the steps of STAGE_STEPS), added to from the workers as each stage
    call returns; one Ray actor per run (`start_stage_counter`), read by the driver's progress line."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(("decoded", "embedded", "answered"), 0)

    def add(self, counts: dict[str, int]) -> None:
        for step, n in counts.items():
            self.counts[step] += n

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def start_stage_counter():
    """The run's StageCounter actor (no CPU: it only adds numbers)."""
    import ray

    return ray.remote(num_cpus=0)(StageCounter).remote()


def stage_counts(stage: str, out) -> dict[str, int]:
    """What one call of `stage` that returned `out` (rows, or a pyarrow table) adds to the steps."""
    steps = STAGE_STEPS.get(stage, ())
    if not steps:
        return {}
    if isinstance(out, pa.Table):
        pairs = out.num_rows
        videos = len(pc.unique(out.column(Col.VIDEO_ID))) if pairs else 0
    else:
        pairs, videos = len(out), len({row.get(Col.VIDEO_ID) for row in out})
    return {step: videos if unit == "videos" else pairs for step, unit in steps}


class Progress:
    """The progress line (module docstring) and the `moref_progress` gauge: a thread writes a line
    FIRST_LINE_S after `start`, then every `interval_s`, with the stages' counts read just before
    (`read_stages`, once the pipeline runs). `emit` None: no lines (on a terminal Ray Data's bars
    show progress), the gauge still moves."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None, first_line_s: float = FIRST_LINE_S):
        self.interval_s, self.clock, self.emit = interval_s, clock, emit
        self.listed_videos: int | None = None  # None: still listing
        self.planned = 0
        self.stages = dict.fromkeys(("decoded", "embedded", "answered"), 0)
        self.committed_pairs = self.errors = 0
        self.read_stages: Callable[[], dict[str, int]] | None = None
        self.on_counts: Callable[[dict[str, int]], None] | None = None  # the gauge
        self.start_time = clock()
        self.pipeline_start: float | None = None
        self.next_line = self.start_time + min(first_line_s, interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def planned_work(self, videos: int, pairs: int) -> None:
        """Planning is done: these videos and pairs are pending; the pipeline starts now."""
        self.listed_videos, self.planned, self.pipeline_start = videos, pairs, self.clock()

    def committed(self, rows: pa.Table) -> None:
        statuses = rows.column(Col.STATUS).to_pylist()
        with self._lock:
            self.committed_pairs += len(statuses)
            self.errors += len(statuses) - statuses.count(STATUS_OK)

    def counts(self) -> dict[str, int]:
        """The steps' counts now (the gauge's values)."""
        if self.read_stages is not None:
            try:
                self.stages.update(self.read_stages())
            except Exception as exc:  # noqa: BLE001 - a missed reading only delays the numbers
                log.debug("stage counts not read: %s", exc)
        with self._lock:
            return {"listed": self.listed_videos or 0, **self.stages, "committed": self.committed_pairs}

    def line(self, counts: dict[str, int], final: str | None = None) -> str:
        """`final`: the last line's ending, "done" or "stopped" (the run failed)."""
        now = self.clock()
        answered = counts["answered"]
        busy = now - self.pipeline_start if self.pipeline_start is not None else 0.0
        rate = answered / busy if busy > 0 else 0.0
        if final:
            tail = f"{final} after {format_duration(now - self.start_time)}"
        elif rate > 0 and answered < self.planned:
            tail = f"eta {format_duration((self.planned - answered) / rate)}"
        else:
            tail = "eta ?"
        listed = ("listing videos" if self.listed_videos is None
                  else f"listed {self.listed_videos} videos ({self.planned} pairs)")
        return (f"progress: {listed}; decoded {counts['decoded']}, embedded {counts['embedded']} videos; "
                f"answered {answered}/{self.planned} pairs, committed {counts['committed']}; "
                f"{self.errors} errors; {rate:.1f} pairs/s, {tail}")

    def tick(self) -> bool:
        """Write a line (and set the gauge) when it is due; True when it was."""
        now = self.clock()
        if now < self.next_line:
            return False
        self.next_line = now + self.interval_s
        self._write()
        return True

    def _write(self, final: str | None = None) -> None:
        counts = self.counts()
        if self.on_counts is not None:
            self.on_counts(counts)
        if self.emit is not None:
            self.emit(self.line(counts, final))

    def start(self) -> Progress:
        """Write from a thread, so that lines come also while nothing moves (listing, models
        loading, the autoscaler adding nodes)."""
        def run() -> None:
            while not self._stop.wait(min(self.interval_s, 0.5)):
                self.tick()

        self._thread = threading.Thread(target=run, name="moref-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self, failed: bool = False, final_line: bool = True) -> None:
        """Stop the thread and write the last line (none for a run stopped by a user's mistake,
        which is its own one `error:` line)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final_line:
            self._write(final="stopped" if failed else "done")


def run_progress(interval_s: float, interactive: bool | None = None) -> Progress:
    """The run's progress, started: lines in the log unless stderr is a terminal."""
    interactive = sys.stderr.isatty() if interactive is None else interactive
    return Progress(interval_s, emit=None if interactive else (lambda line: log.info("%s", line))).start()


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
    """The runner's one handle on metrics and progress once Ray runs: `committed` from the
    committer's on_commit; `counter` is the StageCounter the stages add to; the run's `progress`
    (`run_progress`, started before planning) reads it and sets the moref_progress gauge. `with
    report:` around the pipeline's loop."""

    def __init__(self, run_id: str, planned_pairs: int, progress: Progress):
        self.metrics = RunMetrics(run_id, planned_pairs)
        self.progress = progress
        self.counter = start_stage_counter()
        progress.read_stages = functools.partial(self.stage_counts, PERIODIC_READ_TIMEOUT_S)
        progress.on_counts = self.metrics.progress

    def stage_counts(self, timeout_s: float) -> dict[str, int]:
        """The counts the stages have added so far, from the run's StageCounter."""
        import ray

        return ray.get(self.counter.get.remote(), timeout=timeout_s)

    def committed(self, rows: pa.Table) -> None:
        self.metrics.record(CommitStats.of(rows))
        self.progress.committed(rows)

    def __enter__(self) -> RunReport:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """The stages' last counts, read while the counter lives (it goes with this report). The
        final line waits longer for them than a periodic one: a missed reading here is never redone."""
        self.progress.read_stages = functools.partial(self.stage_counts, FINAL_READ_TIMEOUT_S)
        self.progress.counts()
        self.progress.read_stages = None
