import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.schema import ANSWERS_SCHEMA, empty_answer_row
from pipeline.sink import AnswersWriter, OutputStore, video_key


def _answers(video_ids, question_ids):
    rows = []
    for vid, qid in zip(video_ids, question_ids):
        row = empty_answer_row()
        row.update(run_id="r1", video_id=vid, video_uri=f"/v/{vid}", question_id=qid, question="?", status="ok",
                   answer="a")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA)


def test_video_key_is_safe_and_distinct():
    keys = {video_key(v) for v in ("../../etc/passwd", "a/b.mp4", "a_b.mp4", "a b.mp4")}
    assert len(keys) == 4
    assert all("/" not in k and not k.startswith(".") for k in keys)


def test_writer_groups_by_video_and_resume_reads_pairs(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    summary = AnswersWriter(cfg, "r1")(_answers(["v1", "v1", "v2"], ["q1", "q2", "q1"]))
    assert summary.column_names == ["video_id", "question_id", "status", "error_reason"]
    files = sorted((tmp_path / "out" / "answers").glob("*.parquet"))
    assert len(files) == 2
    assert not list((tmp_path / "out" / "answers").glob("_tmp*"))
    store = OutputStore(cfg)
    assert store.done_pairs() == {("v1", "q1"), ("v1", "q2"), ("v2", "q1")}
    table = pq.read_table(files[0])
    assert table.schema.equals(ANSWERS_SCHEMA)


def test_rewriting_the_same_group_does_not_duplicate(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    AnswersWriter(cfg, "r1")(_answers(["v1"], ["q1"]))
    AnswersWriter(cfg, "r1")(_answers(["v1"], ["q1"]))
    assert OutputStore(cfg).read_answers().num_rows == 1


def test_partial_temp_files_are_ignored(tmp_path):
    cfg = OutputConfig(path=str(tmp_path / "out"))
    AnswersWriter(cfg, "r1")(_answers(["v1"], ["q1"]))
    (tmp_path / "out" / "answers" / "_tmp-deadbeef.parquet").write_bytes(b"PAR1 truncated")
    assert OutputStore(cfg).done_pairs() == {("v1", "q1")}
