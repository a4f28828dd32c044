"""A hostile corpus through the whole pipeline on local disk: every (video, question) pair gets
exactly one row, ok for odd-but-valid videos, an error with the precise reason otherwise; the
summary agrees with the rows; a rerun skips everything; temporary files of a killed run are ignored
and removed; hostile video ids never escape the output directory."""

from __future__ import annotations

import json
import os
import re

import pytest

from pipeline.run.runner import run_job
from pipeline.schema import Col
from pipeline.store.output_store import OutputStore
from tests.reliability.helpers import (
    HOSTILE_LIMITS,
    OK,
    PROMPTS,
    assert_exactly_once,
    build_hostile_corpus,
    check_rows,
    expected_reasons,
    job,
    rows_of,
    write_manifest,
)

pytestmark = pytest.mark.slow


def test_hostile_corpus_local(tmp_path, ray_local):
    corpus = build_hostile_corpus(tmp_path / "in")
    manifest = write_manifest(tmp_path / "in" / "manifest.jsonl", corpus)
    # one per-video question for some videos, so question sets differ in size
    qfile = tmp_path / "in" / "questions.jsonl"
    extra = ["../../etc/one frame.mp4", "empty.mp4", "mjpeg 12 frames.avi"]
    own = [{"video_id": v, "question_id": "own", "question": "Why?"} for v in extra]
    qfile.write_text("".join(json.dumps(q) + "\n" for q in own))
    out = tmp_path / "out"
    cfg = job(str(out), manifest=str(manifest), questions_file=str(qfile), decode=HOSTILE_LIMITS, run_id="hostile")
    expected = {(v, p["question_id"]) for v in corpus for p in PROMPTS} | {(v, "own") for v in extra}

    summary = run_job(cfg)

    rows = rows_of(cfg)
    assert_exactly_once(rows, expected)
    check_rows(rows, {v: want for v, (_, want) in corpus.items()})
    by_id = {(r["video_id"], r["question_id"]): r for r in rows}
    assert by_id[("mjpeg 12 frames.avi", "caption")]["frames_decoded"] == 12  # fewer frames than asked
    assert by_id[("../../etc/one frame.mp4", "own")]["frames_decoded"] == 1
    assert by_id[("too_large.mp4", "caption")][Col.ERROR_DETAIL].endswith("limit is 2000000")
    n_ok = sum(r["status"] == "ok" for r in rows)
    assert n_ok == 2 * sum(want == OK for _, want in corpus.values()) + 2  # + 'own' of one frame and mjpeg

    # the summary (returned, printed, and runs/<run_id>.json) accounts for every row
    assert (summary.inputs, summary.processed, summary.skipped_done) == (len(expected), len(expected), 0)
    assert (summary.ok, summary.errors, summary.status) == (n_ok, len(expected) - n_ok, "complete")
    assert summary.errors_by_reason == expected_reasons(rows)
    assert json.loads((out / "runs" / "hostile.json").read_text()) == summary.to_dict()
    text = summary.render()
    assert f"answered ok: {n_ok}   errors: {len(expected) - n_ok}" in text and "    not_a_video: 6" in text

    # hostile ids stay file names under the output: nothing outside, no odd characters
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    for dirpath, _, files in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        # the output's own bookkeeping: the record of commits, staged frames, the lease's lock files
        assert rel in (".", "answers", "frames", "runs") or rel.split(os.sep)[0] in ("_commits", "_staging"), rel
        files = [f for f in files if not (rel == "." and f in ("_lock.json", "_lock.mutex"))]
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", f) for f in files), files
    frames = OutputStore(cfg.output).read_frames()
    assert set(frames.column("video_id").to_pylist()) == {v for v, (_, want) in corpus.items() if want == OK}

    # a killed run's leftovers: temporaries are ignored by readers and removed by the next run
    (out / "answers" / "_tmp-0123abcd.parquet").write_bytes(b"half a parquet file")
    (out / "frames" / "_tmp-4567ef.parquet").write_bytes(b"")
    assert len(rows_of(cfg)) == len(expected)
    files = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "answers").iterdir() if not p.name.startswith("_"))

    again = run_job(cfg)

    assert (again.inputs, again.skipped_done, again.processed, again.errors_by_reason) == (
        len(expected), len(expected), 0, {})
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "answers").iterdir()) == files
    assert not [p for p in (out / "frames").iterdir() if p.name.startswith("_")]
    assert_exactly_once(rows_of(cfg), expected)
