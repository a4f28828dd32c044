"""Question sets: the importers on small files in each benchmark's public format, reading back,
checks, and the wording the answer stage sees."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.config import ConfigError, QuestionsConfig, StorageConfig
from pipeline.readers.benchmark import (
    MultipleChoiceQuestion,
    duration_group,
    import_longvideobench,
    import_mlvu,
    import_videomme,
    read_benchmark,
    write_benchmark,
)
from pipeline.sources import read_table, word_questions

# Video-MME as published on the Hugging Face hub (videomme/test-*.parquet), one row per question.
VIDEOMME_ROWS = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
     "task_type": "Counting Problem", "question": "How many red socks are above the fireplace?",
     "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."], "answer": "C"},
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-2",
     "task_type": "Object Recognition", "question": "Which object is on the table?",
     "options": ["A. A cup.", "B. A book.", "C. A lamp.", "D. A hat."], "answer": "b"},
]
# MLVU dev (MLVU/json/1_plotQA.json): the answer is the candidate's text; summary tasks have none.
MLVU_RECORDS = [
    {"video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the video?",
     "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"},
    {"video": "movie101_41.mp4", "duration": 4000.5, "question": "Who opens the door?",
     "candidates": ["The girl", "The boy", "Nobody"], "answer": "Nobody", "question_type": "plotQA"},
    {"video": "subPlot_1.mp4", "duration": 500, "question": "Summarize the video.", "answer": "A long summary.",
     "question_type": "summary"},
]
# LongVideoBench (lvb_val.json).
LVB_RECORDS = [
    {"video_id": "86CxyhFV9MI", "question": "In the video, which subtitles appear at the same time as the man?",
     "question_wo_referring_query": "Which subtitles appear?", "candidates": ["Ahh", "Ohh", "Yes", "No", "Maybe"],
     "correct_choice": 3, "position": [1, 2], "topic_category": "NP-News-Programs", "question_category": "TOS",
     "level": "L2-Relation", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
     "subtitle_path": "86CxyhFV9MI_en.json",
     "duration_group": 600, "starting_timestamp_for_subtitles": 0, "duration": 528.6},
]


def test_import_videomme_parquet(tmp_path):
    src = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(VIDEOMME_ROWS), src)
    questions = import_videomme([str(src)])
    assert questions == [
        MultipleChoiceQuestion("fFjv93ACGo8.mp4", "001-1", "How many red socks are above the fireplace?",
                               ("0.", "1.", "2.", "3."), "C", "Counting Problem", "short"),
        MultipleChoiceQuestion("fFjv93ACGo8.mp4", "001-2", "Which object is on the table?",
                               ("A cup.", "A book.", "A lamp.", "A hat."), "B", "Object Recognition", "short"),
    ]


def test_import_videomme_json_with_questions_per_video(tmp_path):
    video = {k: VIDEOMME_ROWS[0][k] for k in ("video_id", "duration", "domain", "videoID")}
    video["questions"] = [{k: r[k] for k in ("question_id", "task_type", "question", "options", "answer")}
                          for r in VIDEOMME_ROWS]
    src = tmp_path / "videomme.json"
    src.write_text(json.dumps([video]))
    questions = import_videomme([str(src)], video_suffix=".mkv")
    assert [(q.video_id, q.question_id, q.answer, q.duration) for q in questions] == [
        ("fFjv93ACGo8.mkv", "001-1", "C", "short"), ("fFjv93ACGo8.mkv", "001-2", "B", "short")]


def test_import_mlvu_keeps_multiple_choice_only(tmp_path):
    src = tmp_path / "1_plotQA.json"
    src.write_text(json.dumps(MLVU_RECORDS))
    assert import_mlvu([str(src)]) == [
        MultipleChoiceQuestion("1_plotQA/movie101_66.mp4", "1_plotQA-0",
                               "What color is the main male character in the video?",
                               ("Yellow", "Red", "Green", "Blue"), "A", "plotQA", "3-10min"),
        MultipleChoiceQuestion("1_plotQA/movie101_41.mp4", "1_plotQA-1", "Who opens the door?",
                               ("The girl", "The boy", "Nobody"), "C", "plotQA", "30min+"),
    ]
    assert [duration_group(s) for s in (0, 179.9, 180, 1799, 1800)] == ["0-3min", "0-3min", "3-10min", "10-30min",
                                                                       "30min+"]


def test_import_longvideobench_json_and_parquet(tmp_path):
    expected = [MultipleChoiceQuestion("86CxyhFV9MI.mp4", "86CxyhFV9MI_0",
                                       "In the video, which subtitles appear at the same time as the man?",
                                       ("Ahh", "Ohh", "Yes", "No", "Maybe"), "D", "TOS", "600")]
    src = tmp_path / "lvb_val.json"
    src.write_text(json.dumps(LVB_RECORDS))
    assert import_longvideobench([str(src)]) == expected
    # The hub's parquet spells the candidates option0..option4, "N/A" when a question has fewer.
    flat = {k: v for k, v in LVB_RECORDS[0].items() if k != "candidates"}
    flat |= {"option0": "Ahh", "option1": "Ohh", "option2": "Yes", "option3": "No", "option4": "N/A",
             "correct_choice": 1}
    parquet = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist([flat]), parquet)
    (got,) = import_longvideobench([str(parquet)])
    assert (got.options, got.answer) == (("Ahh", "Ohh", "Yes", "No"), "B")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_cli_import_writes_a_set_that_reads_back(tmp_path, capsys, suffix):
    src = tmp_path / "1_plotQA.json"
    src.write_text(json.dumps(MLVU_RECORDS))
    out = tmp_path / f"mlvu{suffix}"
    assert main(["import-questions", "--format", "mlvu", str(src), "--out", str(out)]) == 0
    assert "wrote 2 questions about 2 videos" in capsys.readouterr().out
    assert read_benchmark(str(out)) == import_mlvu([str(src)])


def test_read_benchmark_rejects_bad_rows(tmp_path):
    good = MultipleChoiceQuestion("v.mp4", "q1", "Why?", ("yes", "no"), "B")
    path = write_benchmark([good], tmp_path / "set.jsonl")
    assert read_benchmark(path) == [good]
    for bad, message in (({"answer": "C"}, "not one of the letters A-B"), ({"options": []}, "needs 1 to 26 options")):
        row = {**good.__dict__, "options": list(good.options), **bad}
        (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(ConfigError, match=message):
            read_benchmark(str(tmp_path / "bad.jsonl"))
    (tmp_path / "dup.jsonl").write_text((tmp_path / "set.jsonl").read_text() * 2)
    with pytest.raises(ConfigError, match="duplicate"):
        read_benchmark(str(tmp_path / "dup.jsonl"))
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"video_id": "v", "question_id": "q", "question": "?"}) + "\n")
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['options', 'answer'\]"):
        read_benchmark(str(tmp_path / "nocol.jsonl"))


def test_job_questions_are_worded_with_their_options(tmp_path):
    path = write_benchmark([MultipleChoiceQuestion("v.mp4", "q1", "Who?", ("a cat", "a dog"), "A")],
                              tmp_path / "set.parquet")
    open_ended = tmp_path / "open.jsonl"
    open_ended.write_text(json.dumps({"video_id": "v.mp4", "question_id": "q2", "question": "Why?"}) + "\n")
    cfg = QuestionsConfig(file=path, multiple_choice_prompt="longvideobench")
    worded = word_questions(read_table(path, StorageConfig(), "questions.file"), cfg)
    assert worded.column("question")[0].as_py() == ("Who?\nA. a cat\nB. a dog\n"
                                              "Answer with the option's letter from the given choices directly.\n")
    cfg = QuestionsConfig(file=str(open_ended), open_ended_prompt="short_answer")
    worded = word_questions(read_table(str(open_ended), StorageConfig(), "questions.file"), cfg)
    assert worded.column("question")[0].as_py() == "Why? Answer the question using a single word or phrase."
