"""pipeline/run/metrics.py: what a commit adds to the metrics, the metrics as Ray's agent exports them,
and the progress line (its wording, its interval, its thread, Ray Data's bars turned off)."""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pytest

from pipeline.errors import ErrorReason
from pipeline.run.metrics import (
    CommitStats,
    Progress,
    RunMetrics,
    RunReport,
    format_duration,
    quiet_ray_data_progress,
    run_progress,
    stage_counts,
)
from pipeline.schema import ANSWERS_SCHEMA, STATUS_ERROR, STATUS_OK, empty_answer_row
from tests.prometheus import sample, scrape


def answers(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist([{**empty_answer_row(), **row} for row in rows], schema=ANSWERS_SCHEMA)


def ok_row(video: str, question: str, **values) -> dict:
    return {"run_id": "r", "video_id": video, "question_id": question, "status": STATUS_OK, **values}


def error_row(video: str, question: str, reason: ErrorReason, **values) -> dict:
    return {"run_id": "r", "video_id": video, "question_id": question, "status": STATUS_ERROR,
            "error_reason": reason.value, **values}


# Two videos of three answered questions and a video that failed to decode. Video "a"'s decode and
# guidance seconds repeat on both its rows, as the answer stage writes them.
ROWS = answers(
    ok_row("a", "q1", prompt_tokens=100, output_tokens=5, visual_tokens_used=60, visual_tokens_native=90,
           total_flops=4e9, total_flops_native=10e9, decode_s=2.0, guidance_s=0.5, prefill_s=0.25, generate_s=1.0),
    ok_row("a", "q2", prompt_tokens=120, output_tokens=7, visual_tokens_used=60, visual_tokens_native=90,
           total_flops=5e9, total_flops_native=11e9, decode_s=2.0, guidance_s=0.5, prefill_s=0.25, generate_s=2.0),
    ok_row("b", "q1", prompt_tokens=80, output_tokens=3, visual_tokens_used=40, visual_tokens_native=40,
           total_flops=3e9, total_flops_native=3e9, decode_s=1.0, guidance_s=0.25, prefill_s=0.5, generate_s=0.5),
    error_row("c", "q1", ErrorReason.DECODE_FAILED, decode_s=0.125),
    error_row("c", "q2", ErrorReason.DECODE_FAILED, decode_s=0.125),
)


def test_commit_stats_count_pairs_videos_errors_tokens_flops_and_seconds():
    stats = CommitStats.of(ROWS)
    assert stats.pairs == {"ok": 3, "error": 2}
    assert stats.videos == 3
    assert stats.errors == {"decode_failed": 2}
    assert stats.tokens == {"prompt": 300, "output": 15, "visual": 160, "visual_native": 220}
    assert stats.flops == {"spent": 12e9, "native": 24e9}
    assert stats.flops_saved == 12e9  # (10-4) + (11-5) + (3-3); error rows have neither
    # decode and guidance once per video (c never reached guidance), prefill and generate per pair
    assert sorted(stats.stage_seconds["decode"]) == [0.125, 1.0, 2.0]
    assert sorted(stats.stage_seconds["guidance"]) == [0.25, 0.5]
    assert sorted(stats.stage_seconds["prefill"]) == [0.25, 0.25, 0.5]
    assert sorted(stats.stage_seconds["generate"]) == [0.5, 1.0, 2.0]


def test_an_error_without_a_reason_is_counted_as_unknown():
    stats = CommitStats.of(answers({"run_id": "r", "video_id": "x", "question_id": "q", "status": STATUS_ERROR}))
    assert stats.errors == {"unknown": 1} and stats.flops_saved == 0 and stats.stage_seconds["decode"] == []






def test_recorded_metrics_reach_the_nodes_prometheus_endpoint(ray_local):
    """Recorded through ray.util.metrics on the local Ray, read back from its metrics agent."""
    run_id = f"metrics-{uuid.uuid4().hex[:8]}"
    metrics = RunMetrics(run_id, planned_pairs=5)
    metrics.record(CommitStats.of(ROWS))
    metrics.record(CommitStats.of(ROWS.slice(0, 1)))  # a second commit adds to the counters
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # the agent exports every few seconds
        text = scrape(port)
        if sample(text, "ray_moref_pairs_done_total", run_id=run_id, status="ok") == 4:
            break
        time.sleep(1)
    run = {"run_id": run_id}
    assert sample(text, "ray_moref_pairs_done_total", **run, status="ok") == 4, text[-2000:]
    assert sample(text, "ray_moref_pairs_done_total", **run, status="error") == 2
    assert sample(text, "ray_moref_pairs_planned", **run) == 5
    assert sample(text, "ray_moref_videos_done_total", **run) == 4
    assert sample(text, "ray_moref_errors_total", **run, reason="decode_failed") == 2
    assert sample(text, "ray_moref_tokens_total", **run, kind="output") == 15 + 5
    assert sample(text, "ray_moref_flops_saved_total", **run) == 12e9 + 6e9
    assert sample(text, "ray_moref_flops_total", **run, kind="native") == 24e9 + 10e9
    assert sample(text, "ray_moref_stage_seconds_total", **run, stage="decode") == 3.125 + 2.0
    assert sample(text, "ray_moref_stage_duration_seconds_count", **run, stage="generate") == 4
    assert sample(text, "ray_moref_stage_duration_seconds_bucket", **run, stage="generate", le="1.0") == 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_wording_and_interval():
    clock, lines, stages = Clock(), [], {"decoded": 0, "embedded": 0, "answered": 0}
    progress = Progress(interval_s=30, clock=clock, emit=lines.append, first_line_s=5)
    clock.now += 4
    assert not progress.tick() and lines == []
    clock.now += 1  # the first line comes early, while the videos are still being listed
    assert progress.tick()
    assert lines == ["progress: listing videos; decoded 0, embedded 0 videos; answered 0/0 pairs, committed 0; "
                     "0 errors; 0.0 pairs/s, eta ?"]
    clock.now += 5
    progress.planned_work(videos=100, pairs=500)  # the pipeline starts 10 s in
    progress.read_stages = lambda: dict(stages)
    clock.now += 24
    assert not progress.tick()  # an interval after the last line
    stages.update(decoded=12, embedded=10, answered=5)
    progress.committed(ROWS.slice(0, 3))
    clock.now += 1  # 25 s after the pipeline started: 5 pairs answered, 0.2/s, 495 to go in 2475 s
    assert progress.tick()
    assert lines[-1] == ("progress: listed 100 videos (500 pairs); decoded 12, embedded 10 videos; answered 5/500 "
                         "pairs, committed 3; 0 errors; 0.2 pairs/s, eta 41m15s")
    progress.committed(ROWS.slice(3))
    clock.now += 5
    assert not progress.tick()
    progress.stop()
    assert lines[-1] == ("progress: listed 100 videos (500 pairs); decoded 12, embedded 10 videos; answered 5/500 "
                         "pairs, committed 5; 2 errors; 0.2 pairs/s, done after 40s")
    progress.stop(failed=True)
    assert lines[-1].endswith("stopped after 40s")


def test_stage_counts_videos_and_pairs():
    rows = ROWS.to_pylist()
    assert stage_counts("decode", rows) == {"decoded": 3}  # distinct videos of the rows out
    assert stage_counts("guidance", rows[:2]) == {"embedded": 1}
    assert stage_counts("answer", rows) == {"answered": 5}  # rows out are pairs
    assert stage_counts("guidance_and_answer", ROWS) == {"embedded": 3, "answered": 5}
    assert stage_counts("guidance_and_answer", ROWS.slice(0, 0)) == {"embedded": 0, "answered": 0}
    assert stage_counts("answers_rows", ROWS) == {}  # committed pairs are counted by the driver


def test_durations():
    assert [format_duration(s) for s in (0, 44.6, 60, 185, 3599, 3600, 7620)] == \
        ["0s", "45s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m"]


def test_progress_thread_writes_early_and_while_nothing_moves() -> None:
    lines: list[str] = []
    progress = Progress(interval_s=0.05, emit=lines.append, first_line_s=0.01)
    start = time.monotonic()
    progress.start()
    while len(lines) < 3 and time.monotonic() - start < 10:
        time.sleep(0.05)
    progress.stop()
    elapsed = time.monotonic() - start
    assert 4 <= len(lines) <= elapsed / 0.05 + 2, (elapsed, lines)  # at most one line an interval
    assert lines[0].startswith("progress: listing videos;") and "done after" in lines[-1]
    assert all("eta ?" in line for line in lines[:-1])


def test_stage_counts_from_the_workers_are_the_line_and_the_gauge(ray_local):
    """Stages add to the run's counter actor; the line and the moref_progress gauge read the same."""
    run_id = f"progress-{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    progress = Progress(interval_s=3600, emit=lines.append)
    progress.planned_work(videos=3, pairs=5)
    report = RunReport(run_id, 5, progress)

    @ray_local.remote(num_cpus=0)
    def stage_call(counter, stage, rows):
        from pipeline.run.runner import _count

        _count(counter, stage, rows)  # what each stage batch does in a run, in a Ray worker

    ray_local.get([stage_call.remote(report.counter, "decode", ROWS.to_pylist()),
                   stage_call.remote(report.counter, "guidance_and_answer", ROWS.slice(0, 3))])
    report.committed(ROWS.slice(0, 3))
    report.__exit__(None, None, None)  # the run's end: the stages' last counts read from the counter
    progress.stop()
    assert "decoded 3, embedded 2 videos; answered 3/5 pairs, committed 3; 0 errors" in lines[-1]
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    want = {"listed": 3, "decoded": 3, "embedded": 2, "answered": 3, "committed": 3}
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # the agent exports every few seconds
        text = scrape(port)
        if sample(text, "ray_moref_progress", run_id=run_id, step="committed") == 3:
            break
        time.sleep(1)
    assert {step: sample(text, "ray_moref_progress", run_id=run_id, step=step) for step in want} == want


def test_no_lines_on_a_terminal_and_ray_datas_bars_only_there(data_context):
    on_terminal = run_progress(30, interactive=True)
    on_terminal.stop()
    assert on_terminal.emit is None and data_context.enable_progress_bars
    assert quiet_ray_data_progress(interactive=False)
    assert not data_context.enable_progress_bars and not data_context.enable_operator_progress_bars


@pytest.fixture
def data_context(ray_local):
    ctx = ray_local.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = True
    yield ctx
    ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved
