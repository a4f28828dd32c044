import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, InputConfig, QuestionsConfig, StorageConfig
from pipeline.sources import list_videos, load_questions, questions_for


@pytest.fixture
def video_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    for rel in ("a.mp4", "b.mkv", "sub/a.mp4", "notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (len(rel) + 1))
    return tmp_path


def test_glob_lists_files_with_relative_ids_and_sizes(video_tree):
    videos = list_videos(InputConfig(videos=[f"{video_tree}/**/*.mp4", f"{video_tree}/*.mkv"]))
    assert [v.video_id for v in videos] == ["a.mp4", "b.mkv", "sub/a.mp4"]
    assert videos[2].video_uri == f"{video_tree}/sub/a.mp4"
    assert videos[2].size_bytes == len("sub/a.mp4") + 1


def test_glob_matching_nothing_fails_fast(tmp_path):
    with pytest.raises(ConfigError, match="no files match"):
        list_videos(InputConfig(videos=f"{tmp_path}/*.mp4"))


def test_limit(video_tree):
    assert len(list_videos(InputConfig(videos=f"{video_tree}/**/*.mp4", limit=1))) == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_and_relative_uris(tmp_path, fmt):
    table = pa.table({"video_uri": ["clips/x.mp4", "/abs/y.mp4"], "video_id": ["x", "y"]})
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        path.write_text("video_uri,video_id\nclips/x.mp4,x\n/abs/y.mp4,y\n")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in table.to_pylist()))
    else:
        pq.write_table(table, path)
    videos = list_videos(InputConfig(manifest=str(path)))
    assert [(v.video_id, v.video_uri) for v in videos] == [("x", f"{tmp_path}/clips/x.mp4"), ("y", "/abs/y.mp4")]


def test_manifest_conflicting_ids_and_missing_columns(tmp_path):
    (tmp_path / "dup.csv").write_text("uri,video_id\na.mp4,v\nb.mp4,v\n")
    with pytest.raises(ConfigError, match="names two videos"):
        list_videos(InputConfig(manifest=str(tmp_path / "dup.csv")))
    (tmp_path / "nouri.csv").write_text("path\na.mp4\n")
    with pytest.raises(ConfigError, match="missing column"):
        list_videos(InputConfig(manifest=str(tmp_path / "nouri.csv")))


def test_questions_file_and_global_prompts(tmp_path):
    (tmp_path / "q.jsonl").write_text(
        '{"video_id": "a.mp4", "question_id": "q1", "question": "Who?"}\n'
        '{"video_id": "a.mp4", "question_id": "q2", "question": "Where?"}\n'
    )
    per_video, prompts = load_questions(
        QuestionsConfig(file=str(tmp_path / "q.jsonl"), prompts=["Caption it."]), StorageConfig()
    )
    assert [q.question_id for q in questions_for("a.mp4", per_video, prompts)] == ["q1", "q2", "prompt-0"]
    assert [q.question for q in questions_for("other", per_video, prompts)] == ["Caption it."]


def test_duplicate_question_pairs_fail(tmp_path):
    (tmp_path / "q.csv").write_text("video_id,question_id,question\na,q1,x\na,q1,y\n")
    with pytest.raises(ConfigError, match="duplicate"):
        load_questions(QuestionsConfig(file=str(tmp_path / "q.csv")), StorageConfig())


def test_csv_ids_stay_text(tmp_path):
    (tmp_path / "q.csv").write_text("video_id,question_id,question\n0001,007,Who?\n")
    per_video, _ = load_questions(QuestionsConfig(file=str(tmp_path / "q.csv")), StorageConfig())
    assert list(per_video) == ["0001"] and per_video["0001"][0].question_id == "007"
    (tmp_path / "m.csv").write_text("uri,video_id\n/v/a.mp4,0042\n")
    assert list_videos(InputConfig(manifest=str(tmp_path / "m.csv")))[0].video_id == "0042"
