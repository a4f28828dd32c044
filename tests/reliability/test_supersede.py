"""Replacing rows (output.retry_errors, resume off) keeps each pair exactly once, also when the
writer dies half-way: the stages are driven directly here, without Ray."""

from __future__ import annotations

import pyarrow as pa

from pipeline.runner import plan_work
from pipeline.schema import ANSWERS_SCHEMA, Col, empty_answer_row
from pipeline.sink import ANSWERS_DIR, AnswersWriter, OutputStore, video_key
from tests.reliability.helpers import PROMPTS, job, pairs_of, rows_of

CAPTION, COUNT = (p["question_id"] for p in PROMPTS)


def answers(run_id: str, video: str, outcomes: dict[str, str | None]) -> pa.Table:
    """Answer rows for one video: question_id -> None (ok) or an error reason."""
    rows = []
    for qid, reason in outcomes.items():
        row = empty_answer_row()
        row.update(run_id=run_id, video_id=video, video_uri=video, question_id=qid, question=qid,
                   status="ok" if reason is None else "error", answer=None if reason else "yes")
        row.update({Col.ERROR_REASON: reason, Col.ERROR_DETAIL: reason and f"{reason} in run {run_id}"})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def old_answers(video: str, outcomes: dict[str, str | None]) -> pa.Table:
    """Answer rows as the version before error_reason wrote them: one `error` column, "reason: detail"."""
    schema = pa.schema([("run_id", pa.string()), ("video_id", pa.string()), ("question_id", pa.string()),
                        ("status", pa.string()), ("error", pa.string()), ("answer", pa.string())])
    return pa.Table.from_pylist(
        [{"run_id": "old", "video_id": video, "question_id": qid, "status": "ok" if error is None else "error",
          "error": error, "answer": None if error else "yes"} for qid, error in outcomes.items()],
        schema=schema,
    )


def test_retried_errors_replace_their_rows_and_a_crash_never_duplicates(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "in" / name).write_bytes(b"x")
    out = str(tmp_path / "out")
    cfg = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"retry_errors": True})
    first = AnswersWriter(cfg.output, "r1")
    first(answers("r1", "a.mp4", {CAPTION: "timeout", COUNT: None}))
    first(answers("r1", "b.mp4", {CAPTION: "not_a_video", COUNT: "crashed"}))
    store = OutputStore(cfg.output)

    rows, summary = plan_work(cfg, store)
    todo = {r["video_id"]: r["question_ids"] for r in rows}
    assert todo == {"a.mp4": [CAPTION], "b.mp4": [COUNT]}  # not_a_video is final, the others transient
    assert (summary.inputs, summary.skipped_done, summary.retried_errors) == (4, 2, 2)

    # the retry of a.mp4 succeeds: its row replaces the error row, the file keeps the other pair
    AnswersWriter(cfg.output, "r2", supersede=True)(answers("r2", "a.mp4", {CAPTION: None}))
    table = rows_of(cfg)
    every_pair = {("a.mp4", CAPTION), ("a.mp4", COUNT), ("b.mp4", CAPTION), ("b.mp4", COUNT)}
    assert sorted(pairs_of(table)) == sorted(every_pair)
    assert {(r["video_id"], r["question_id"]): r["run_id"] for r in table}[("a.mp4", CAPTION)] == "r2"

    # the retry of b.mp4 dies after removing the old row, before its new file is in place
    writer = AnswersWriter(cfg.output, "r2", supersede=True)
    new = answers("r2", "b.mp4", {COUNT: None})
    pending = store.write_table(new, ANSWERS_DIR, f"_pending-{video_key('b.mp4')}-x.parquet")
    store.supersede("b.mp4", {COUNT}, keep=pending)
    # ... crash. The pair is absent, never twice; the next run cleans up and does it again.
    assert ("b.mp4", COUNT) not in pairs_of(rows_of(cfg)) and len(rows_of(cfg)) == 3
    assert store.clean_temporaries() == 1
    rows, summary = plan_work(cfg, store)
    assert {r["video_id"]: r["question_ids"] for r in rows} == {"b.mp4": [COUNT]}
    writer(new)
    final = rows_of(cfg)
    assert len(final) == 4 and len(set(pairs_of(final))) == 4
    assert all(r["status"] == "ok" for r in final if (r["video_id"], r["question_id"]) != ("b.mp4", CAPTION))

    # resume off recomputes everything; the new rows replace the old ones
    again = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"resume": False})
    rows, summary = plan_work(again, store)
    assert sum(len(r["question_ids"]) for r in rows) == 4 and summary.skipped_done == 0
    redo = AnswersWriter(again.output, "r3", supersede=True)
    redo(answers("r3", "a.mp4", {CAPTION: None, COUNT: None}))
    redo(answers("r3", "b.mp4", {CAPTION: "not_a_video: text", COUNT: None}))
    final = rows_of(again)
    assert len(final) == 4 and {r["run_id"] for r in final} == {"r3"}
    assert len(store.list_files(ANSWERS_DIR)) == 2


def test_answers_files_of_the_previous_version_are_resumed_by_their_error_prefix(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / "in" / name).write_bytes(b"x")
    out = str(tmp_path / "out")
    cfg = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"retry_errors": True})
    store = OutputStore(cfg.output)
    store.write_table(old_answers("a.mp4", {CAPTION: "read_failed: s3://b/a.mp4: ConnectionError: reset",
                                            COUNT: None}), ANSWERS_DIR, "old-a.parquet")
    store.write_table(old_answers("b.mp4", {CAPTION: "truncated: video ends at 1.00 s of 9.00 s",
                                            COUNT: "failed before the answer stage"}), ANSWERS_DIR, "old-b.parquet")
    # a file of the current version beside them: its rows are read by error_reason
    AnswersWriter(cfg.output, "r2")(answers("r2", "c.mp4", {CAPTION: "vision_failed", COUNT: "no_frames"}))

    status = store.answer_status()
    assert status[("a.mp4", CAPTION)] == ("error", "read_failed") and status[("a.mp4", COUNT)] == ("ok", None)
    assert status[("b.mp4", CAPTION)] == ("error", "truncated")
    assert status[("b.mp4", COUNT)] == ("error", "failed_before_answer")
    assert status[("c.mp4", CAPTION)] == ("error", "vision_failed")
    rows, summary = plan_work(cfg, store)
    # transient: read_failed (old file) and vision_failed (new file); the others are final
    assert {r["video_id"]: r["question_ids"] for r in rows} == {"a.mp4": [CAPTION], "c.mp4": [CAPTION]}
    assert (summary.inputs, summary.skipped_done, summary.retried_errors) == (6, 4, 2)

    # naming the reasons works on old rows alike
    named = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"retry_errors": ["truncated"]})
    rows, _ = plan_work(named, store)
    assert {r["video_id"]: r["question_ids"] for r in rows} == {"b.mp4": [CAPTION]}
