"""Listing and planning in Ray tasks (pipeline/run/listing.py, pipeline/run/planning.py): globs, manifests
(local and on the moto S3 server), questions, duplicates, limit, and resume against the record."""

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, QuestionsConfig, StorageConfig, parse_job_config, prompt_id
from pipeline.run import planning
from pipeline.run.listing import split_glob
from pipeline.schema import ANSWERS_SCHEMA, Col
from pipeline.sources import word_questions
from pipeline.store.commit_log import CommitLog, write_pending
from pipeline.store.output_store import ANSWERS_DIR, OutputStore

CAPTION = [{"question_id": "caption", "question": "Caption it."}]


@pytest.fixture(params=["tasks", "driver"])
def where(request):
    """Planning tests run both ways (`input.planning`): in Ray tasks and on the driver."""
    return request.param


def plan(tmp_path, inputs: dict, where: str, questions: dict | None = None,
         output: dict | None = None) -> planning.Plan:
    inputs = {"planning": where, **inputs}
    cfg = parse_job_config({"input": inputs, "questions": questions or {"prompts": CAPTION},
                            "output": {"path": str(tmp_path / "out"), **(output or {})}})
    with planning.config_errors():
        return planning.plan_work(cfg, OutputStore(cfg.output))


def rows(tmp_path, inputs: dict, where: str, **kwargs) -> list[dict]:
    return plan(tmp_path, inputs, where, **kwargs).rows()


@pytest.fixture
def video_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    for rel in ("a.mp4", "b.mkv", "sub/a.mp4", "notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (len(rel) + 1))
    return tmp_path


def test_glob_lists_files_with_relative_ids_and_sizes(video_tree, ray_local, where):
    # overlapping globs: a file both match is planned once
    got = rows(video_tree, {"videos": [f"{video_tree}/**/*.mp4", f"{video_tree}/*.mkv", f"{video_tree}/*.mp4"]}, where)
    assert [v["video_id"] for v in got] == ["a.mp4", "b.mkv", "sub/a.mp4"]
    assert got[2]["video_uri"] == f"{video_tree}/sub/a.mp4"
    assert got[2]["size_bytes"] == len("sub/a.mp4") + 1
    assert got[0]["question_ids"] == ["caption"] and got[0]["questions"] == ["Caption it."]


def test_glob_is_split_by_folder_and_listed_in_tasks(tmp_path, ray_local, where):
    for rel in ("top.mp4", "2024-01/a.mp4", "2024-01/deep/b.mp4", "2024-02/c.mp4", "2023-12/d.mp4", "2024-x.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    units = split_glob(f"{tmp_path}/**/*.mp4", StorageConfig())
    # the top level, then one unit per sub-folder
    assert sorted(u["url"] for u in units) == sorted(
        [f"{tmp_path}/*.mp4"] + [f"{tmp_path}/{d}/**/*.mp4" for d in ("2023-12", "2024-01", "2024-02")])
    assert [v["video_id"] for v in rows(tmp_path, {"videos": f"{tmp_path}/**/*.mp4"}, where)] == [
        "2023-12/d.mp4", "2024-01/a.mp4", "2024-01/deep/b.mp4", "2024-02/c.mp4", "2024-x.mp4", "top.mp4"]
    # a wildcard folder: only the matching sub-folders are listed, ids still relative to the root
    assert [v["video_id"] for v in rows(tmp_path, {"videos": f"{tmp_path}/2024-*/*.mp4"}, where)] == [
        "2024-01/a.mp4", "2024-02/c.mp4"]


def test_glob_over_object_storage(s3_bucket, s3_server, tmp_path, ray_local, where):
    fs, bucket, _ = s3_bucket
    for rel in ("v/a.mp4", "v/x/b.mp4", "v/y/z/c.mp4", "v/y/notes.txt"):
        fs.pipe(f"{bucket}/{rel}", b"abc")
    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    got = rows(tmp_path, {"videos": f"s3://{bucket}/v/**/*.mp4", "storage": storage}, where)
    assert [(v["video_id"], v["video_uri"], v["size_bytes"]) for v in got] == [
        ("a.mp4", f"s3://{bucket}/v/a.mp4", 3), ("x/b.mp4", f"s3://{bucket}/v/x/b.mp4", 3),
        ("y/z/c.mp4", f"s3://{bucket}/v/y/z/c.mp4", 3)]


def test_glob_matching_nothing_fails_fast(tmp_path, ray_local, where):
    with pytest.raises(ConfigError, match="no files match"):
        plan(tmp_path, {"videos": f"{tmp_path}/*.mp4"}, where)


def test_limit_takes_the_first_ids(video_tree, ray_local, where):
    p = plan(video_tree, {"videos": f"{video_tree}/**/*.m*", "limit": 2}, where)
    assert [v["video_id"] for v in p.rows()] == ["a.mp4", "b.mkv"]
    assert (p.videos, p.inputs, p.pending_pairs) == (2, 2, 2)


def test_limit_applies_before_matching_and_unmatched_questions_are_named(video_tree, ray_local, where):
    """Questions of videos input.limit leaves out name a listed video: not counted as unmatched.
    Those naming no listed video are counted, and the first ones named."""
    qfile = video_tree / "q.jsonl"
    qfile.write_text("".join(json.dumps({"video_id": v, "question_id": q, "question": "Why?"}) + "\n" for v, q in [
        ("a.mp4", "q1"), ("sub/a.mp4", "q1"), ("typo.mp4", "q2"), ("typo.mp4", "q1"), ("gone.mkv", "q1")]))
    p = plan(video_tree, {"videos": f"{video_tree}/**/*.m*", "limit": 1}, where, questions={"file": str(qfile)})
    assert [v["video_id"] for v in p.rows()] == ["a.mp4"]
    assert (p.inputs, p.unmatched_questions) == (1, 3)  # sub/a.mp4's question is cut by the limit, not unmatched
    assert p.unmatched_examples == [("gone.mkv", "q1"), ("typo.mp4", "q1"), ("typo.mp4", "q2")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_and_relative_uris(tmp_path, fmt, ray_local, where):
    table = pa.table({"video_uri": ["clips/x.mp4", "/abs/y.mp4"], "video_id": ["x", "y"]})
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        path.write_text("video_uri,video_id\nclips/x.mp4,x\n/abs/y.mp4,y\n")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in table.to_pylist()))
    else:
        pq.write_table(table, path)
    got = rows(tmp_path, {"manifest": str(path)}, where)
    assert [(v["video_id"], v["video_uri"], v["size_bytes"]) for v in got] == [
        ("x", f"{tmp_path}/clips/x.mp4", -1), ("y", "/abs/y.mp4", -1)]


def test_manifest_on_object_storage(s3_bucket, s3_server, tmp_path, ray_local, where):
    fs, bucket, _ = s3_bucket
    with fs.open(f"{bucket}/lists/m.parquet", "wb") as f:
        pq.write_table(pa.table({"video_uri": ["a.mp4", f"s3://{bucket}/b.mp4"]}), f)
    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    got = rows(tmp_path, {"manifest": f"s3://{bucket}/lists/m.parquet", "storage": storage}, where)
    assert [(v["video_id"], v["video_uri"]) for v in got] == [
        ("a.mp4", f"s3://{bucket}/lists/a.mp4"), ("b.mp4", f"s3://{bucket}/b.mp4")]


def test_manifest_repeats_conflicts_and_missing_columns(tmp_path, ray_local, where):
    (tmp_path / "rep.csv").write_text("uri,video_id\nc.mp4,w\nd.mp4,x\nc.mp4,w\n")
    p = plan(tmp_path, {"manifest": str(tmp_path / "rep.csv")}, where)
    assert [r["video_id"] for r in p.rows()] == ["w", "x"] and (p.videos, p.inputs) == (2, 2)
    (tmp_path / "dup.csv").write_text("uri,video_id\na.mp4,v\nb.mp4,v\n")
    with pytest.raises(ConfigError, match="names two videos"):
        plan(tmp_path, {"manifest": str(tmp_path / "dup.csv")}, where)
    (tmp_path / "nouri.csv").write_text("path\na.mp4\n")
    with pytest.raises(ConfigError, match="missing column"):
        plan(tmp_path, {"manifest": str(tmp_path / "nouri.csv")}, where)
    with pytest.raises(ConfigError, match="file not found"):
        plan(tmp_path, {"manifest": str(tmp_path / "none.csv")}, where)


def test_questions_file_and_global_prompts(tmp_path, ray_local, where):
    for name in ("a.mp4", "other.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "q.jsonl").write_text(
        '{"video_id": "a.mp4", "question_id": "q2", "question": "Where?"}\n'
        '{"video_id": "gone.mp4", "question_id": "q1", "question": "Who?"}\n'
        '{"video_id": "a.mp4", "question_id": "q1", "question": "Who?"}\n'
    )
    p = plan(tmp_path, {"videos": f"{tmp_path}/*.mp4"}, where,
             questions={"file": str(tmp_path / "q.jsonl"), "prompts": ["Caption it."]})
    got = {r["video_id"]: r for r in p.rows()}
    # the file's questions in file order, then the prompts
    assert got["a.mp4"]["question_ids"] == ["q2", "q1", prompt_id("Caption it.")]
    assert got["a.mp4"]["questions"] == ["Where?", "Who?", "Caption it."]
    assert got["other.mp4"]["questions"] == ["Caption it."]
    assert (p.videos, p.inputs, p.unmatched_questions) == (2, 4, 1)


def test_duplicate_question_pairs_and_prompt_clashes_fail(tmp_path, ray_local, where):
    (tmp_path / "a").write_bytes(b"x")
    inputs = {"videos": f"{tmp_path}/a"}
    (tmp_path / "q.csv").write_text("video_id,question_id,question\na,q1,x\na,q1,y\n")
    with pytest.raises(ConfigError, match="duplicate"):
        plan(tmp_path, inputs, where, questions={"file": str(tmp_path / "q.csv")})
    (tmp_path / "q.csv").write_text("video_id,question_id,question\na,q1,x\n")
    with pytest.raises(ConfigError, match=r"question_id\(s\) \['q1'\] used both"):
        plan(tmp_path, inputs, where, questions={"file": str(tmp_path / "q.csv"),
                                          "prompts": [{"question_id": "q1", "question": "?"}]})
    (tmp_path / "q.csv").write_text("video_id,question_id,question\na,q1,\n")
    with pytest.raises(ConfigError, match="empty question"):
        plan(tmp_path, inputs, where, questions={"file": str(tmp_path / "q.csv")})


def test_csv_ids_stay_text(tmp_path, ray_local, where):
    (tmp_path / "0001").write_bytes(b"x")
    (tmp_path / "q.csv").write_text("video_id,question_id,question\n0001,007,Who?\n")
    got = rows(tmp_path, {"videos": f"{tmp_path}/0001"}, where, questions={"file": str(tmp_path / "q.csv")})
    assert [(r["video_id"], r["question_ids"]) for r in got] == [("0001", ["007"])]
    (tmp_path / "m.csv").write_text("uri,video_id\n/v/a.mp4,0042\n")
    assert rows(tmp_path, {"manifest": str(tmp_path / "m.csv")}, where)[0]["video_id"] == "0042"


def test_word_questions_reads_ids_as_text():
    table = pa.table({"video_id": [1, 2], "question_id": [7, 8], "question": ["A?", "B?"]})
    out = word_questions(table, QuestionsConfig(prompts=["x"], open_ended_prompt="short_answer"))
    assert out.column("video_id").to_pylist() == ["1", "2"]
    assert out.column("question").to_pylist()[0] == "A? Answer the question using a single word or phrase."


def test_resume_skips_recorded_pairs_and_redoes_transient_errors(tmp_path, ray_local, where, monkeypatch):
    """A manifest of 300 videos x 2 prompts against a record of 250 done videos, one with a
    transient error (redone) and one with a final error (kept): planning across several tasks'
    batches is exact."""
    manifest = tmp_path / "m.parquet"
    ids = [f"v{i:04d}" for i in range(300)]
    pq.write_table(pa.table({"video_uri": [f"/x/{i}.mp4" for i in ids], "video_id": ids}), manifest, row_group_size=64)
    prompts = [{"question_id": "caption", "question": "Caption it."}, {"question_id": "who", "question": "Who?"}]
    store = OutputStore(parse_job_config({"input": {"manifest": str(manifest)}, "questions": {"prompts": prompts},
                                          "output": {"path": str(tmp_path / "out")}}).output)
    done = []
    for vid in ids[:250]:
        for qid in ("caption", "who"):
            row = {Col.VIDEO_ID: vid, Col.QUESTION_ID: qid, Col.STATUS: "ok", Col.RUN_ID: "r0"}
            if (vid, qid) == ("v0007", "who"):
                row.update({Col.STATUS: "error", Col.ERROR_REASON: "read_failed"})  # transient: redone
            if (vid, qid) == ("v0008", "who"):
                row.update({Col.STATUS: "error", Col.ERROR_REASON: "not_a_video"})  # final: kept
            done.append(row)
    table = pa.Table.from_pylist(done, schema=ANSWERS_SCHEMA)
    CommitLog(store).apply([write_pending(store, table, ANSWERS_DIR, "part-r0-x.parquet")], {})
    monkeypatch.setattr(planning, "PLAN_BATCH_VIDEOS", 64)  # several planning tasks
    p = plan(tmp_path, {"manifest": str(manifest)}, where, questions={"prompts": prompts},
             output={"retry_errors": True})
    got = {r["video_id"]: r["question_ids"] for r in p.rows()}
    assert got == {"v0007": ["who"], **{vid: ["caption", "who"] for vid in ids[250:]}}
    assert (p.videos, p.inputs, p.skipped_done, p.retried_errors) == (300, 600, 499, 1)
    assert (p.pending_videos, p.pending_pairs) == (51, 101)
    # resume off plans every pair again
    assert plan(tmp_path, {"manifest": str(manifest)}, where, questions={"prompts": prompts},
                output={"resume": False}).pending_pairs == 600


def test_written_pairs_are_changed_exactly_where_their_fingerprint_differs():
    """The changed-pair rule at planning's core, on many pairs: a written row is changed when its
    fingerprint is not the one this job would write for its question; a row without one (written
    before fingerprints) stays done; unwritten pairs are neither."""
    from pipeline.fingerprint import pair_fingerprint
    from pipeline.store.key_index import KeyIndex

    job_print = "job-config-digest"
    texts = ["Describe it.", "Who is there?", "Describe it."]  # two videos share a question text
    pairs = pa.table({Col.VIDEO_ID: [f"v{i}" for i in range(3000)], Col.QUESTION_ID: ["q"] * 3000})
    questions = pa.array([texts[i % 3] for i in range(3000)])
    written = pairs.slice(0, 2000)  # the last 1000 pairs are new
    # written rows: every 5th by another question text, every 7th before fingerprints (null)
    prints = [None if i % 7 == 0 else pair_fingerprint(job_print, "old" if i % 5 == 0 else texts[i % 3])
              for i in range(2000)]
    indexes = planning._Indexes(None, (KeyIndex(written), pa.array(prints, pa.string())), None, [], job_print)
    done, changed = planning._done_and_changed(pairs, questions, indexes)
    expect_changed = [i < 2000 and i % 7 != 0 and i % 5 == 0 for i in range(3000)]
    assert changed.tolist() == expect_changed
    assert done.tolist() == [i < 2000 and not c for i, c in enumerate(expect_changed)]
    # resume off for changes (output.redo_changed: false): every written pair stays done
    kept = planning._Indexes(None, indexes.done, None, [], None)
    done, changed = planning._done_and_changed(pairs, questions, kept)
    assert done.tolist() == [i < 2000 for i in range(3000)] and not changed.any()
