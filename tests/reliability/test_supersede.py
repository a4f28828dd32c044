"""Replacing rows (output.retry_errors, resume off) keeps each pair exactly once, also when the
writer dies half-way: the driver's committer is driven directly here, without Ray."""

from __future__ import annotations

import pyarrow as pa

from pipeline.run.runner import plan_work
from pipeline.schema import ANSWERS_SCHEMA, Col, empty_answer_row
from pipeline.store.commit_log import CommitLog, write_pending
from pipeline.store.committer import OutputCommitter
from pipeline.store.output_store import ANSWERS_DIR, OutputStore
from tests.reliability.helpers import PROMPTS, job, pairs_of, rows_of

CAPTION, COUNT = (p["question_id"] for p in PROMPTS)


def write(cfg, run_id: str, *tables: pa.Table, supersede: bool = False) -> None:
    committer = OutputCommitter(OutputStore(cfg.output), run_id, supersede)
    for table in tables:
        committer.add(table)
    committer.close()


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


def test_retried_errors_replace_their_rows_and_a_crash_never_duplicates(tmp_path, ray_local):
    (tmp_path / "in").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "in" / name).write_bytes(b"x")
    out = str(tmp_path / "out")
    cfg = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"retry_errors": True})
    write(cfg, "r1", answers("r1", "a.mp4", {CAPTION: "timeout", COUNT: None}),
          answers("r1", "b.mp4", {CAPTION: "not_a_video", COUNT: "crashed"}))
    store = OutputStore(cfg.output)

    plan, summary = plan_work(cfg, store)
    rows = plan.rows()
    todo = {r["video_id"]: r["question_ids"] for r in rows}
    assert todo == {"a.mp4": [CAPTION], "b.mp4": [COUNT]}  # not_a_video is final, the others transient
    assert (summary.inputs, summary.skipped_done, summary.retried_errors) == (4, 2, 2)

    # the retry of a.mp4 succeeds: its row replaces the error row, the file keeps the other pairs
    write(cfg, "r2", answers("r2", "a.mp4", {CAPTION: None}), supersede=True)
    table = rows_of(cfg)
    every_pair = {("a.mp4", CAPTION), ("a.mp4", COUNT), ("b.mp4", CAPTION), ("b.mp4", COUNT)}
    assert sorted(pairs_of(table)) == sorted(every_pair)
    assert {(r["video_id"], r["question_id"]): r["run_id"] for r in table}[("a.mp4", CAPTION)] == "r2"

    # the retry of b.mp4 dies after writing its files and record, before the commit's journal:
    # nothing of it is visible, the old row stays, the pair is retried again
    new = answers("r2", "b.mp4", {COUNT: None})
    log = CommitLog(store)
    log.write_manifest(ANSWERS_DIR, write_pending(store, new, ANSWERS_DIR, "part-r2-crashed.parquet").record)
    assert sorted(pairs_of(rows_of(cfg))) == sorted(every_pair)
    assert store.clean_temporaries() == 1
    plan, summary = plan_work(cfg, store)
    rows = plan.rows()
    assert {r["video_id"]: r["question_ids"] for r in rows} == {"b.mp4": [COUNT]}

    # ... and dies again, after the journal, with the old file removed but the new one not moved
    # into place: the pair is absent (never twice) until the next run rolls the commit forward
    old_files = [p.rsplit("/", 1)[-1] for p in store.list_files(ANSWERS_DIR)]
    holder = [n for n in old_files if any(r["video_id"] == "b.mp4" for r in
                                          store.read_files([store.path(ANSWERS_DIR, n)]).to_pylist())]
    kept = store.read_files([store.path(ANSWERS_DIR, holder[0])])
    kept = kept.filter(pa.array([not (r["video_id"] == "b.mp4" and r["question_id"] == COUNT)
                                 for r in kept.to_pylist()]))
    files = [write_pending(store, new, ANSWERS_DIR, "part-r2-new.parquet"),
             write_pending(store, kept, ANSWERS_DIR, "part-r2-kept.parquet")]
    for f in files:
        log.write_manifest(ANSWERS_DIR, f.record)
    store.write_json({"moves": [[ANSWERS_DIR, f.name] for f in files], "removes": [[ANSWERS_DIR, holder[0]]]},
                     "_commits", "_txn", "crashed.json")
    store.remove(store.path(ANSWERS_DIR, holder[0]))
    assert len(set(pairs_of(rows_of(cfg)))) == len(pairs_of(rows_of(cfg)))  # never twice
    assert log.recover() == 1
    final = rows_of(cfg)
    assert sorted(pairs_of(final)) == sorted(every_pair)
    assert all(r["status"] == "ok" for r in final if (r["video_id"], r["question_id"]) != ("b.mp4", CAPTION))
    assert plan_work(cfg, store)[0].rows() == []

    # resume off recomputes everything; the new rows replace the old ones
    again = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"resume": False})
    plan, summary = plan_work(again, store)
    rows = plan.rows()
    assert sum(len(r["question_ids"]) for r in rows) == 4 and summary.skipped_done == 0
    write(again, "r3", answers("r3", "a.mp4", {CAPTION: None, COUNT: None}),
          answers("r3", "b.mp4", {CAPTION: "not_a_video: text", COUNT: None}), supersede=True)
    final = rows_of(again)
    assert len(final) == 4 and {r["run_id"] for r in final} == {"r3"}
    assert len(store.list_files(ANSWERS_DIR)) == 1


def test_answers_files_of_the_previous_version_are_resumed_by_their_error_prefix(tmp_path, ray_local):
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
    write(cfg, "r2", answers("r2", "c.mp4", {CAPTION: "vision_failed", COUNT: "no_frames"}))

    status = store.answer_status()
    assert status[("a.mp4", CAPTION)] == ("error", "read_failed") and status[("a.mp4", COUNT)] == ("ok", None)
    assert status[("b.mp4", CAPTION)] == ("error", "truncated")
    assert status[("b.mp4", COUNT)] == ("error", "failed_before_answer")
    assert status[("c.mp4", CAPTION)] == ("error", "vision_failed")
    plan, summary = plan_work(cfg, store)
    rows = plan.rows()
    # transient: read_failed (old file) and vision_failed (new file); the others are final
    assert {r["video_id"]: r["question_ids"] for r in rows} == {"a.mp4": [CAPTION], "c.mp4": [CAPTION]}
    assert (summary.inputs, summary.skipped_done, summary.retried_errors) == (6, 4, 2)

    # naming the reasons works on old rows alike
    named = job(out, videos=str(tmp_path / "in" / "*.mp4"), output_opts={"retry_errors": ["truncated"]})
    rows = plan_work(named, store)[0].rows()
    assert {r["video_id"]: r["question_ids"] for r in rows} == {"b.mp4": [CAPTION]}


def test_a_retried_pair_of_a_previous_version_file_replaces_its_row(tmp_path):
    """The older file is rewritten without the pair in its own (old) schema, and its record rows
    take their reasons from its `error` column."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"x")
    cfg = job(str(tmp_path / "out"), videos=str(tmp_path / "in" / "*.mp4"), output_opts={"retry_errors": True})
    store = OutputStore(cfg.output)
    store.write_table(old_answers("a.mp4", {CAPTION: "read_failed: s3://b/a.mp4: reset", COUNT: "timeout: slow"}),
                      ANSWERS_DIR, "old-a.parquet")
    write(cfg, "r2", answers("r2", "a.mp4", {CAPTION: None}), supersede=True)
    rows = {(r["video_id"], r["question_id"]): (r["run_id"], r["status"]) for r in rows_of(cfg)}
    assert rows == {("a.mp4", CAPTION): ("r2", "ok"), ("a.mp4", COUNT): ("old", "error")}
    assert store.answer_status() == {("a.mp4", CAPTION): ("ok", None), ("a.mp4", COUNT): ("error", "timeout")}
