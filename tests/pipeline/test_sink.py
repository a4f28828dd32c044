"""The driver's committer: answers (and the same videos' frames) in files of many videos, exactly
one row per pair, the record under _commits/ agreeing with the files."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, STATUS_OK, Col, empty_answer_row
from pipeline.stages.output_rows import FramesWriter
from pipeline.store.commit_log import CommitLog
from pipeline.store.committer import OutputCommitter
from pipeline.store.compact import compact
from pipeline.store.output_store import ANSWERS_DIR, FRAMES_DIR, OutputStore, video_key


def _answers(video_ids, question_ids, run_id="r1", status="ok"):
    rows = []
    for vid, qid in zip(video_ids, question_ids):
        row = empty_answer_row()
        row.update(run_id=run_id, video_id=vid, video_uri=f"/v/{vid}", question_id=qid, question="?", status=status,
                   answer="a" if status == "ok" else None)
        if status != "ok":
            row.update({Col.ERROR_REASON: "timeout", Col.ERROR_DETAIL: "slow"})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def _stage_frames(cfg, vid, n=3):
    FramesWriter(cfg).write_row({Col.VIDEO_ID: vid, Col.STATUS: STATUS_OK, Col.CLIP_MODEL: "m",
                                 Col.FRAME_EMBEDDINGS: np.ones((n, 4), np.float32), Col.FRAME_INDICES: np.arange(n),
                                 Col.FRAME_TIMES_S: np.arange(n) * 0.5})


def test_video_key_is_safe_and_distinct():
    keys = {video_key(v) for v in ("../../etc/passwd", "a/b.mp4", "a_b.mp4", "a b.mp4")}
    assert len(keys) == 4
    assert all("/" not in k and not k.startswith(".") for k in keys)


def test_files_hold_many_videos_up_to_the_cap_and_frames_follow_their_answers(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"), max_videos_per_file=4)
    store = OutputStore(cfg)
    committer = OutputCommitter(store, "r1", supersede=False)
    videos = [f"v{i}.mp4" for i in range(10)]
    for vid in videos:
        _stage_frames(cfg, vid)
        committer.add(_answers([vid, vid], ["q1", "q2"]))
    assert committer.files_written == 2  # after videos 4 and 8; two still buffered
    committer.close()
    answers = sorted((tmp_path / "out" / ANSWERS_DIR).glob("*.parquet"))
    frames = sorted((tmp_path / "out" / FRAMES_DIR).glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in answers] != [] and len(answers) == 3 and len(frames) == 3
    assert sorted(pq.read_metadata(p).num_rows for p in answers) == [4, 8, 8]
    for a in answers:  # a frames file holds exactly the videos of the answers file of the same name
        f = tmp_path / "out" / FRAMES_DIR / a.name
        assert set(pq.read_table(f).column("video_id").to_pylist()) == set(pq.read_table(a).column("video_id")
                                                                           .to_pylist())
        assert pq.read_schema(a).equals(ANSWERS_SCHEMA)
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))
    table = store.read_answers()
    pairs = list(zip(table.column("video_id").to_pylist(), table.column("question_id").to_pylist()))
    assert sorted(pairs) == sorted((v, q) for v in videos for q in ("q1", "q2"))
    assert store.read_frames().num_rows == 30
    record = store.answer_status_table()
    assert record.num_rows == 20 and set(record.column("status").to_pylist()) == {"ok"}


def test_the_record_answers_resume_without_reading_data_files(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    store = OutputStore(cfg)
    committer = OutputCommitter(store, "r1", supersede=False)
    committer.add(_answers(["v1", "v2"], ["q1", "q1"], status="error"))
    committer.close()
    # a data file that cannot be read: resume must come from the record alone
    for p in (tmp_path / "out" / ANSWERS_DIR).glob("*.parquet"):
        p.write_bytes(b"not parquet any more")
    status = store.answer_status()
    assert status == {("v1", "q1"): ("error", "timeout"), ("v2", "q1"): ("error", "timeout")}


def test_superseding_rewrites_older_files_without_the_replaced_rows(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    store = OutputStore(cfg)
    first = OutputCommitter(store, "r1", supersede=False)
    for vid in ("a", "b"):
        _stage_frames(cfg, vid, n=2)
    first.add(_answers(["a", "a", "b"], ["q1", "q2", "q1"], status="error"))
    first.close()
    _stage_frames(cfg, "a", n=5)  # a is guided again: its new frames replace the old ones
    second = OutputCommitter(store, "r2", supersede=True)
    second.add(_answers(["a"], ["q1"], run_id="r2"))
    second.close()
    rows = {(r["video_id"], r["question_id"]): (r["run_id"], r["status"]) for r in store.read_answers().to_pylist()}
    assert rows == {("a", "q1"): ("r2", "ok"), ("a", "q2"): ("r1", "error"), ("b", "q1"): ("r1", "error")}
    assert store.read_answers().num_rows == 3
    frames = store.read_frames().to_pylist()
    assert sorted((f["video_id"], len([g for g in frames if g["video_id"] == f["video_id"]])) for f in frames
                  if f["frame_index"] == 0) == [("a", 5), ("b", 2)]
    record = CommitLog(store).record(ANSWERS_DIR)
    assert record.num_rows == 3 and len(store.list_files(ANSWERS_DIR)) == 2


def test_partial_temp_files_are_ignored(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    committer = OutputCommitter(OutputStore(cfg), "r1", supersede=False)
    committer.add(_answers(["v1"], ["q1"]))
    committer.close()
    (tmp_path / "out" / "answers" / "_tmp-deadbeef.parquet").write_bytes(b"PAR1 truncated")
    (tmp_path / "out" / "answers" / "_pending-part-x.parquet").write_bytes(b"PAR1 truncated")
    assert OutputStore(cfg).done_pairs() == {("v1", "q1")}
    assert OutputStore(cfg).answer_status_table().num_rows == 1


def test_compaction_merges_small_files_into_one_with_the_same_rows(tmp_path):
    """Without Ray (as `moref-index compact` runs) the merge runs in this process, the same code."""
    cfg = OutputConfig(path=str(tmp_path / "out"), max_videos_per_file=1)
    store = OutputStore(cfg)
    committer = OutputCommitter(store, "r1", supersede=False)
    for vid in ("a", "b", "c"):
        _stage_frames(cfg, vid)
        committer.add(_answers([vid, vid], ["q1", "q2"]))
    committer.close()
    assert len(store.list_files(ANSWERS_DIR)) == 3 and len(store.list_files(FRAMES_DIR)) == 3
    by_answer, by_frame = [("video_id", "ascending"), ("question_id", "ascending")], [("video_id", "ascending"),
                                                                                      ("frame_index", "ascending")]
    answers, frames = store.read_answers().sort_by(by_answer), store.read_frames().sort_by(by_frame)

    result = compact(store, target_mb=64)
    assert result.files_after == {ANSWERS_DIR: 1, FRAMES_DIR: 1} and result.rows == {ANSWERS_DIR: 6, FRAMES_DIR: 9}
    assert store.read_answers().sort_by(by_answer).equals(answers)
    assert store.read_frames().sort_by(by_frame).equals(frames)
    (name,) = [p.rsplit("/", 1)[-1] for p in store.list_files(FRAMES_DIR)]
    record = CommitLog(store).record(FRAMES_DIR)
    assert sorted(zip(record.column("video_id").to_pylist(), record.column("file").to_pylist())) == [
        (v, name) for v in ("a", "b", "c")]
    assert CommitLog(store).record(ANSWERS_DIR).num_rows == 6
