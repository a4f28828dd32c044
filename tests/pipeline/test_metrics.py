"""pipeline/run/metrics.py: what a commit adds to the metrics, the metrics as Ray's agent exports them,
and the progress line (its wording, its interval, its thread, Ray Data's bars turned off)."""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pytest

from pipeline.errors import ErrorReason
from pipeline.run.metrics import CommitStats, Progress, RunMetrics, RunReport, format_duration
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
    clock, lines = Clock(), []
    progress = Progress(planned_pairs=500, interval_s=30, clock=clock, emit=lines.append)
    clock.now += 10
    assert not progress.tick() and lines == []  # within the interval
    clock.now += 20
    assert progress.tick()
    assert lines == ["progress: 0/500 pairs (0 written), 0 videos, 0 errors, 0.0 pairs/s, eta ?"]
    progress.received(ROWS)
    progress.committed(3)
    clock.now += 20
    assert not progress.tick()
    clock.now += 10  # 60 s in: 5 pairs at 1/12 pairs/s, 495 to go in 5940 s
    assert progress.tick()
    assert lines[-1] == "progress: 5/500 pairs (3 written), 3 videos, 2 errors, 0.1 pairs/s, eta 1h39m"
    clock.now += 5  # the next line is an interval after the last, not after the start
    assert not progress.tick()
    progress.stop()
    assert lines[-1] == "progress: 5/500 pairs (3 written), 3 videos, 2 errors, 0.1 pairs/s, done after 1m05s"
    progress.stop(failed=True)
    assert lines[-1].endswith("stopped after 1m05s")


def test_durations():
    assert [format_duration(s) for s in (0, 44.6, 60, 185, 3599, 3600, 7620)] == \
        ["0s", "45s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m"]


def test_progress_thread_logs_while_no_rows_arrive() -> None:
    lines: list[str] = []
    progress = Progress(planned_pairs=10, interval_s=0.05, emit=lines.append)
    start = time.monotonic()
    progress.start()
    while len(lines) < 3 and time.monotonic() - start < 10:
        time.sleep(0.05)
    progress.stop()
    elapsed = time.monotonic() - start
    assert 4 <= len(lines) <= elapsed / 0.05 + 2, (elapsed, lines)  # at most one line an interval
    assert lines[0].startswith("progress: 0/10 pairs") and lines[-1].startswith("progress: 0/10 pairs")
    assert "done after" in lines[-1] and all("eta ?" in line for line in lines[:-1])


@pytest.fixture
def data_context(ray_local):
    ctx = ray_local.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = True
    yield ctx
    ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved


def test_progress_line_replaces_ray_datas_bars_only_off_a_terminal(data_context):
    on_terminal = RunReport("tty-run", 4, 30, interactive=True)
    assert on_terminal.progress is None and data_context.enable_progress_bars
    with on_terminal:
        on_terminal.received(ROWS)  # nothing to count: Ray Data's bars show progress
    in_a_log = RunReport("log-run", 4, 30, interactive=False)
    assert in_a_log.progress is not None
    assert not data_context.enable_progress_bars and not data_context.enable_operator_progress_bars
    in_a_log.received(ROWS)
    in_a_log.committed(ROWS)
    assert (in_a_log.progress.pairs, in_a_log.progress.written, in_a_log.progress.errors) == (5, 5, 2)
