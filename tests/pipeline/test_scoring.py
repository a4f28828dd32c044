"""Scoring a small output whose right answers are known, to exact numbers; and compare mode."""

import json
import re

import pyarrow as pa
import pytest

from jobs.cli import main
from pipeline.config import OutputConfig
from pipeline.readers.benchmark import MultipleChoiceQuestion, write_benchmark
from pipeline.schema import ANSWERS_SCHEMA, empty_answer_row
from pipeline.store.output_store import OutputStore

OPTIONS = ("a cat", "a dog", "red", "red car")
QUESTIONS = [
    MultipleChoiceQuestion("v1.mp4", "q1", "Who?", OPTIONS, "A", "Temporal", "short"),
    MultipleChoiceQuestion("v1.mp4", "q2", "Who?", OPTIONS, "C", "Temporal", "short"),
    MultipleChoiceQuestion("v2.mp4", "q3", "Who?", OPTIONS, "B", "Counting", "medium"),
    MultipleChoiceQuestion("v2.mp4", "q4", "Who?", OPTIONS, "D", "Counting", "medium"),
    MultipleChoiceQuestion("v3.mp4", "q5", "Who?", OPTIONS, "A", "Counting", "long"),
    MultipleChoiceQuestion("v3.mp4", "q6", "Who?", OPTIONS, "B"),
]
# Run A (64 frames, native): q1 right, q2 right, q3 unanswerable, q4 an error, q5 not answered yet,
# q6 two letters; plus a row for a question not in the set.
RUN_A = {"q1": "A", "q2": "The answer is C", "q3": "I don't know", "q4": None, "q6": "A and B", "extra": "B"}
# Run B (256 frames, MoRef N=4): q1 wrong, q5 wrong by option text, the rest right.
RUN_B = {"q1": "(B)", "q2": "C", "q3": "b.", "q4": "D", "q5": "red car", "q6": "Option B"}


def write_run(path, run_id, answers, frames, references, flops):
    rows = []
    for qid, text in answers.items():
        row = empty_answer_row()
        video = next((q.video_id for q in QUESTIONS if q.question_id == qid), "v9.mp4")
        row.update(run_id=run_id, video_id=video, video_uri=f"/data/{video}", question_id=qid, question="Who?",
                   model="tiny", status="ok" if text else "error", answer=text,
                   error_reason=None if text else "not_found", error_detail=None if text else "/data/v2.mp4",
                   frame_indices=list(range(frames)) if text else None,
                   references=references, prompt_tokens=100 * frames, output_tokens=3, visual_tokens_used=10 * frames,
                   total_flops=flops, total_flops_native=4 * flops if references > 1 else flops,
                   attn_flops_ratio=(frames / 64) ** 2 if references == 1 else 1.643)
        rows.append(row)
    OutputStore(OutputConfig(path=str(path))).write_table(pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA),
                                                           "answers", f"{run_id}.parquet")
    return str(path)


@pytest.fixture
def runs(tmp_path):
    questions = write_benchmark(QUESTIONS, tmp_path / "set.jsonl")
    a = write_run(tmp_path / "native64", "native64", RUN_A, frames=64, references=1, flops=1e12)
    b = write_run(tmp_path / "moref256", "moref256", RUN_B, frames=256, references=4, flops=2e12)
    return questions, a, b


def group(accuracy, n, correct, unanswerable, errors, missing, questions, accuracy_of_all):
    return dict(accuracy=accuracy, n=n, correct=correct, unanswerable=unanswerable, errors=errors, missing=missing,
                questions=questions, accuracy_of_all=accuracy_of_all)


def score_json(capsys, *argv):
    assert main(["score", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_score_counts_exactly(runs, capsys):
    questions, a, _ = runs
    score = score_json(capsys, a, "--questions", questions)
    assert score["overall"] == group(1.0, 2, 2, 2, 1, 1, 6, 2 / 6)
    assert score["by_category"] == {
        "(none)": group(None, 0, 0, 1, 0, 0, 1, 0.0),
        "Counting": group(None, 0, 0, 1, 1, 1, 3, 0.0),
        "Temporal": group(1.0, 2, 2, 0, 0, 0, 2, 1.0),
    }
    assert list(score["by_duration"]) == ["short", "medium", "long", "(none)"]
    assert score["by_duration"]["short"] == group(1.0, 2, 2, 0, 0, 0, 2, 1.0)
    assert score["by_duration"]["medium"] == group(None, 0, 0, 1, 1, 0, 2, 0.0)
    assert score["by_duration"]["long"] == group(None, 0, 0, 0, 0, 1, 1, 0.0)
    assert score["unanswerable_by_reason"] == {"no_choice": 1, "several_choices": 1}
    assert score["errors_by_reason"] == {"not_found": 1}
    assert score["rows_not_in_questions"] == 1
    assert (score["run_ids"], score["models"], score["questions"]) == (["native64"], ["tiny"], 6)
    assert score["spend"] == {
        "answers": 4, "prompt_tokens": 4 * 6400, "output_tokens": 12, "visual_tokens_used": 4 * 640,
        "total_flops": 4e12, "total_flops_native": 4e12, "mean_attn_flops_ratio": 1.0, "mean_frames": 64.0,
        "references": {"1": 4}}


def test_compare_shows_both_runs_and_their_spend(runs, capsys):
    questions, a, b = runs
    both = score_json(capsys, a, "--questions", questions, "--compare", b)
    first, second = both["runs"]
    assert (first["output"], second["output"]) == (a, b)
    assert second["overall"] == group(4 / 6, 6, 4, 0, 0, 0, 6, 4 / 6)
    assert second["spend"]["total_flops_native"] == 6 * 8e12 and second["spend"]["references"] == {"4": 6}

    assert main(["score", a, "--questions", questions, "--compare", b]) == 0
    text = capsys.readouterr().out
    cells = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]
    lines = {row[0]: row for row in cells}
    assert lines["overall"] == ["overall", "100.0%", "2", "66.7%", "6", "-33.3"]
    assert lines["Temporal"] == ["Temporal", "100.0%", "2", "50.0%", "2", "-50.0"]
    assert lines["Counting"] == ["Counting", "-", "0", "66.7%", "3", "-"]
    assert lines["total FLOPs"] == ["total FLOPs", "4.000e+12", "1.200e+13"]
    assert lines["total FLOPs native"] == ["total FLOPs native", "4.000e+12", "4.800e+13"]
    assert lines["mean frames"] == ["mean frames", "64.0", "256.0"]
    assert lines["prompt tokens"] == ["prompt tokens", "25,600", "153,600"]
    assert "A unanswerable: no_choice 1, several_choices 1" in text and "A errors: not_found 1" in text


def test_single_run_text_report(runs, capsys):
    questions, a, _ = runs
    assert main(["score", a, "--questions", questions]) == 0
    text = capsys.readouterr().out
    assert "runs: native64" in text
    overall = next(line for line in text.splitlines() if line.startswith("overall")).split()
    assert overall == ["overall", "100.0%", "2", "2", "1", "1"]


def test_bad_question_set_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "set.jsonl").write_text(json.dumps({"video_id": "v", "question_id": "q", "question": "?"}) + "\n")
    assert main(["score", str(tmp_path), "--questions", str(tmp_path / "set.jsonl")]) == 2
    assert "missing column(s) ['options', 'answer']" in capsys.readouterr().err
