"""Multiple-choice question sets, and importers from the public benchmark annotation formats.

A question set is a JSONL or Parquet file, one row per question: `video_id`, `question_id`,
`question`, `options` (list, in letter order, without letters), `answer` (the right letter),
`category` and `duration` (a duration group such as "short"; both optional). The same file is a
job's `questions.file` (the answer stage sees each question worded with its options, see
pipeline.sources) and the key `moref-index score` checks the answers against.

`IMPORTERS` read Video-MME, MLVU (its multiple-choice tasks) and LongVideoBench annotations.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from freemoref.prompts import OPTION_LETTERS
from pipeline.config import ConfigError, StorageConfig


@dataclass(frozen=True)
class MultipleChoiceQuestion:
    video_id: str
    question_id: str
    question: str
    options: tuple[str, ...]
    answer: str  # the right option's letter
    category: str | None = None
    duration: str | None = None


BENCHMARK_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("question_id", pa.string()), ("question", pa.string()),
    ("options", pa.list_(pa.string())), ("answer", pa.string()), ("category", pa.string()),
    ("duration", pa.string()),
])


def _text_or_none(value) -> str | None:
    return None if value is None or value == "" else str(value)


def read_benchmark(url: str, storage: StorageConfig | None = None) -> list[MultipleChoiceQuestion]:
    """Read and check a question set: every row has options and a letter among them, and each
    (video_id, question_id) appears once."""
    from pipeline.sources import read_table

    what = f"question set {url}"
    table = read_table(url, storage or StorageConfig(), what)
    missing = [c for c in ("video_id", "question_id", "question", "options", "answer") if c not in table.column_names]
    if missing:
        raise ConfigError(f"{what}: missing column(s) {missing}; found {table.column_names}")
    questions, seen = [], set()
    for row in table.to_pylist():
        key = (str(row["video_id"]), str(row["question_id"]))
        options = tuple(str(o) for o in (row["options"] or ()))
        answer = str(row["answer"] or "").strip().upper()
        if not options or len(options) > len(OPTION_LETTERS):
            raise ConfigError(f"{what}: {key}: needs 1 to {len(OPTION_LETTERS)} options, got {len(options)}")
        if answer not in OPTION_LETTERS[:len(options)]:
            raise ConfigError(f"{what}: {key}: answer {row['answer']!r} is not one of the letters "
                              f"A-{OPTION_LETTERS[len(options) - 1]}")
        if key in seen:
            raise ConfigError(f"{what}: duplicate (video_id, question_id) = {key}")
        seen.add(key)
        questions.append(MultipleChoiceQuestion(*key, question=str(row["question"]), options=options, answer=answer,
                                                category=_text_or_none(row.get("category")),
                                                duration=_text_or_none(row.get("duration"))))
    return questions


def write_benchmark(questions: list[MultipleChoiceQuestion], path: str | pathlib.Path) -> str:
    """Write a question set as `.jsonl` or `.parquet` (by the file name)."""
    path = pathlib.Path(path)
    rows = [asdict(q) | {"options": list(q.options)} for q in questions]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=BENCHMARK_SCHEMA), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    else:
        raise ValueError(f"{path}: a question set is written as .jsonl or .parquet")
    return str(path)


def read_records(path: str | pathlib.Path) -> list[dict]:
    """The records of an annotation file: a JSON list, JSON lines, or Parquet."""
    path = pathlib.Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


_LETTERED = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*")


def strip_letter(option: str, index: int) -> str:
    """'B. a box' or '(B) a box' at index 1 -> 'a box'; text without its own letter is kept."""
    match = _LETTERED.match(option)
    return option[match.end():].strip() if match and match.group(1) == OPTION_LETTERS[index] else option.strip()


def import_videomme(paths: list[str], video_suffix: str = ".mp4") -> list[MultipleChoiceQuestion]:
    """Video-MME: the Hugging Face parquet (one row per question: videoID, question_id, task_type,
    duration, question, options "A. ...", answer) or the JSON with a `questions` list per video.
    video_id = videoID + `video_suffix`, the file names of its videos; category = task_type."""
    out = []
    for path in paths:
        for record in read_records(path):
            for q in record.get("questions") or [record]:
                options = tuple(strip_letter(o, i) for i, o in enumerate(q["options"]))
                out.append(MultipleChoiceQuestion(
                    video_id=f"{record['videoID']}{video_suffix}", question_id=str(q["question_id"]),
                    question=q["question"].strip(), options=options, answer=q["answer"].strip().upper(),
                    category=q.get("task_type"), duration=record.get("duration")))
    return out


# MLVU durations are seconds; questions are grouped by these bounds (minutes).
MLVU_DURATION_BOUNDS_MIN = (3, 10, 30)


def duration_group(seconds: float, bounds_min: tuple[int, ...] = MLVU_DURATION_BOUNDS_MIN) -> str:
    """60 -> '0-3min', 400 -> '3-10min', 4000 -> '30min+'."""
    lower = 0
    for bound in bounds_min:
        if seconds < bound * 60:
            return f"{lower}-{bound}min"
        lower = bound
    return f"{lower}min+"


def import_mlvu(paths: list[str]) -> list[MultipleChoiceQuestion]:
    """MLVU dev JSON files (`json/1_plotQA.json`, ...: video, duration, question, candidates,
    answer as the candidate's text, question_type). Only multiple-choice records (with candidates)
    are kept. video_id = '<file stem>/<video>', the path under `video/` (glob `MLVU/video/**/*.mp4`)."""
    out = []
    for path in paths:
        stem = pathlib.Path(path).stem
        index = 0
        for record in read_records(path):
            candidates = record.get("candidates")
            if not candidates:
                continue  # generation tasks (sub_scene, summary)
            options = tuple(str(c).strip() for c in candidates)
            answer = str(record["answer"]).strip()
            letter = OPTION_LETTERS[options.index(answer)] if answer in options else answer.upper()
            out.append(MultipleChoiceQuestion(
                video_id=f"{stem}/{record['video']}", question_id=f"{stem}-{index}",
                question=record["question"].strip(),
                options=options, answer=letter, category=record.get("question_type"),
                duration=duration_group(float(record["duration"])) if record.get("duration") is not None else None))
            index += 1
    return out


def import_longvideobench(paths: list[str]) -> list[MultipleChoiceQuestion]:
    """LongVideoBench `lvb_val.json` (id, video_path, question, candidates, correct_choice,
    question_category, duration_group) or its parquet (option0..option4, "N/A" when unused).
    video_id = video_path; category = question_category; duration = duration_group (seconds)."""
    out = []
    for path in paths:
        for record in read_records(path):
            candidates = record.get("candidates")
            if candidates is None:
                candidates = [record[f"option{i}"] for i in range(5) if record.get(f"option{i}") not in (None, "N/A")]
            out.append(MultipleChoiceQuestion(
                video_id=str(record["video_path"]), question_id=str(record["id"]), question=record["question"].strip(),
                options=tuple(str(c).strip() for c in candidates), answer=OPTION_LETTERS[int(record["correct_choice"])],
                category=record.get("question_category"), duration=_text_or_none(record.get("duration_group"))))
    return out


IMPORTERS = {"videomme": import_videomme, "mlvu": import_mlvu, "longvideobench": import_longvideobench}
