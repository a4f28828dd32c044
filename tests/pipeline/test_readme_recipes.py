"""The README's DuckDB recipes, each run as written on a real run's output."""

import re

import duckdb
import pytest

from tests.paths import REPO


def recipes() -> dict[str, str]:
    """First comment line of each SQL block of the README's "Query the output" -> the SQL."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Query the output"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    return {b.splitlines()[0].removeprefix("-- "): b for b in blocks}


def run(sql: str, output) -> list[dict]:
    result = duckdb.sql(sql.replace("OUTPUT", str(output)))
    assert result is not None  # every recipe is a query (None is for statements)
    return [dict(zip(result.columns, row)) for row in result.fetchall()]


def test_the_readme_has_the_four_recipes():
    assert [name.split(" ")[0] for name in recipes()] == ["answers", "error", "FLOPs", "join"]


def test_answers_for_one_video(small_run_output):
    rows = run(recipes()["answers for one video"], small_run_output)
    assert [(r["question_id"], r["status"]) for r in rows] == [("cooking", "ok"), ("who", "ok")]
    assert all(isinstance(r["answer"], str) for r in rows)


def test_error_breakdown(small_run_output):
    (row,) = run(recipes()["error breakdown: rows and videos per reason"], small_run_output)
    assert row["answers"] == 2 and row["videos"] == 1 and row["reason"] in ("not_a_video", "unreadable_container")


def test_flops_saved(small_run_output):
    (row,) = run(next(sql for name, sql in recipes().items() if name.startswith("FLOPs")), small_run_output)
    assert row["answers"] == 4
    assert 0 < row["flops_spent_share"] < 1 and row["flops_saved_share"] == pytest.approx(1 - row["flops_spent_share"])
    assert row["visual_tokens_used"] < row["visual_tokens_native"]


def test_join_answers_to_frames_by_time(small_run_output):
    rows = run(next(sql for name, sql in recipes().items() if name.startswith("join")), small_run_output)
    # 2 videos x 2 questions x 4 frames each, every frame found in the frames table
    assert len(rows) == 16
    assert all(len(r["embedding"]) == 32 for r in rows)
    per_answer = {}
    for r in rows:
        per_answer.setdefault((r["video_id"], r["question_id"]), []).append(r["time_s"])
    assert len(per_answer) == 4 and all(len(t) == 4 for t in per_answer.values())
