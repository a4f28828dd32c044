"""Accuracy of a run's answers against a multiple-choice question set (`moref-index score`).

Each question of the set is one of: answered (an option letter was read from an `ok` row, see
pipeline.readers.choice_extraction), unanswerable (an `ok` row whose text names no single option), error
(an `error` row), or missing (no row yet). Accuracy is correct / answered, so that unanswerable,
error and missing questions are reported apart rather than counted wrong; `accuracy_of_all` counts
them wrong. Totals come overall, by category and by duration group, with what the run spent:
tokens and FLOPs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.readers.benchmark import MultipleChoiceQuestion
from pipeline.readers.choice_extraction import extract_choice
from pipeline.schema import STATUS_OK, Col

SCORE_COLUMNS = [
    Col.VIDEO_ID, Col.QUESTION_ID, Col.STATUS, Col.ERROR_REASON, Col.ANSWER, Col.RUN_ID, Col.MODEL, Col.FRAME_INDICES,
    Col.REFERENCES, Col.PROMPT_TOKENS, Col.OUTPUT_TOKENS, Col.VISUAL_TOKENS_USED, Col.TOTAL_FLOPS,
    Col.TOTAL_FLOPS_NATIVE, Col.ATTN_FLOPS_RATIO,
]
NO_GROUP = "(none)"
ANSWERED, UNANSWERABLE, ERROR, MISSING = "answered", "unanswerable", "error", "missing"


@dataclass
class Tally:
    """Counts of one group of questions."""

    correct: int = 0
    answered: int = 0
    unanswerable: int = 0
    errors: int = 0
    missing: int = 0

    def add(self, outcome: str, correct: bool) -> None:
        if outcome == ANSWERED:
            self.answered += 1
            self.correct += int(correct)
        elif outcome == UNANSWERABLE:
            self.unanswerable += 1
        elif outcome == ERROR:
            self.errors += 1
        else:
            self.missing += 1

    def to_dict(self) -> dict:
        total = self.answered + self.unanswerable + self.errors + self.missing
        return {
            "accuracy": self.correct / self.answered if self.answered else None,
            "n": self.answered,
            "correct": self.correct,
            "unanswerable": self.unanswerable,
            "errors": self.errors,
            "missing": self.missing,
            "questions": total,
            "accuracy_of_all": self.correct / total if total else None,
        }


@dataclass
class Spend:
    """What the scored `ok` rows cost."""

    answers: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    visual_tokens_used: int = 0
    total_flops: float = 0.0
    total_flops_native: float = 0.0
    attn_flops_ratios: list[float] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    references: Counter = field(default_factory=Counter)

    def add(self, row: dict) -> None:
        self.answers += 1
        self.prompt_tokens += int(row[Col.PROMPT_TOKENS] or 0)
        self.output_tokens += int(row[Col.OUTPUT_TOKENS] or 0)
        self.visual_tokens_used += int(row[Col.VISUAL_TOKENS_USED] or 0)
        self.total_flops += float(row[Col.TOTAL_FLOPS] or 0.0)
        self.total_flops_native += float(row[Col.TOTAL_FLOPS_NATIVE] or 0.0)
        if row[Col.ATTN_FLOPS_RATIO] is not None:
            self.attn_flops_ratios.append(float(row[Col.ATTN_FLOPS_RATIO]))
        self.frames.append(len(row[Col.FRAME_INDICES] or ()))
        self.references[int(row[Col.REFERENCES] or 1)] += 1

    def to_dict(self) -> dict:
        return {
            "answers": self.answers,
            Col.PROMPT_TOKENS: self.prompt_tokens,
            Col.OUTPUT_TOKENS: self.output_tokens,
            Col.VISUAL_TOKENS_USED: self.visual_tokens_used,
            Col.TOTAL_FLOPS: self.total_flops,
            Col.TOTAL_FLOPS_NATIVE: self.total_flops_native,
            "mean_attn_flops_ratio": _mean(self.attn_flops_ratios),
            "mean_frames": _mean(self.frames),
            "references": {str(k): v for k, v in sorted(self.references.items())},
        }


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _group_order(name: str):
    """Video-MME's short/medium/long first, then numbers by value (LongVideoBench's 15, 60, 600,
    3600; '3-10min'), then text."""
    known = {"short": 0, "medium": 1, "long": 2}
    number = re.match(r"\d+(\.\d+)?", name)
    return (known.get(name, 3), float(number.group()) if number else float("inf"), name)


def score_answers(answers: pa.Table, questions: list[MultipleChoiceQuestion]) -> dict:
    """Score an answers table (at least SCORE_COLUMNS) against `questions`."""
    rows = {(r[Col.VIDEO_ID], r[Col.QUESTION_ID]): r for r in answers.select(SCORE_COLUMNS).to_pylist()}
    overall, by_category, by_duration = Tally(), dict[str, Tally](), dict[str, Tally]()
    spend = Spend()
    unanswerable, errors = Counter[str](), Counter[str]()
    for q in questions:
        row = rows.get((q.video_id, q.question_id))
        correct = False
        if row is None:
            outcome = MISSING
        elif row[Col.STATUS] != STATUS_OK:
            outcome = ERROR
            errors[row[Col.ERROR_REASON] or "unknown"] += 1
        else:
            spend.add(row)
            choice = extract_choice(row[Col.ANSWER], list(q.options))
            outcome = ANSWERED if choice.letter else UNANSWERABLE
            correct = choice.letter == q.answer
            if not choice.letter:
                unanswerable[choice.how] += 1
        for tally in (overall, by_category.setdefault(q.category or NO_GROUP, Tally()),
                      by_duration.setdefault(q.duration or NO_GROUP, Tally())):
            tally.add(outcome, correct)
    asked = {(q.video_id, q.question_id) for q in questions}
    scored_rows = [r for key, r in rows.items() if key in asked]
    return {
        "questions": len(questions),
        "overall": overall.to_dict(),
        "by_category": {k: by_category[k].to_dict() for k in sorted(by_category)},
        "by_duration": {k: by_duration[k].to_dict() for k in sorted(by_duration, key=_group_order)},
        "unanswerable_by_reason": dict(sorted(unanswerable.items())),
        "errors_by_reason": dict(sorted(errors.items())),
        "rows_not_in_questions": len(rows) - len(scored_rows),
        "run_ids": sorted({r[Col.RUN_ID] for r in scored_rows if r[Col.RUN_ID]}),
        "models": sorted({r[Col.MODEL] for r in scored_rows if r[Col.MODEL]}),
        "spend": spend.to_dict(),
    }


def score_output(output_path: str, questions: list[MultipleChoiceQuestion], storage=None) -> dict:
    """Score the answers table under a job's `output.path` (local or any fsspec URL);
    OutputNotFoundError when it holds none."""
    from pipeline.config import OutputConfig, StorageConfig
    from pipeline.store.output_store import ANSWERS_DIR, OutputStore

    store = OutputStore(OutputConfig(path=output_path, storage=storage or StorageConfig()))
    store.require(ANSWERS_DIR)
    answers = store.read_answers(columns=SCORE_COLUMNS)
    return {"output": output_path, **score_answers(answers, questions)}


def _table(rows: list[list[str]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _groups(score: dict) -> list[tuple[str, tuple | None]]:
    """(label, key path) of every table row: overall, then categories, then duration groups."""
    rows: list[tuple[str, tuple | None]] = [("overall", ("overall",))]
    for section, title in (("by_category", "category"), ("by_duration", "duration")):
        rows.append((title, None))
        rows += [(f"  {name}", (section, name)) for name in score[section]]
    return rows


def _lookup(score: dict, path: tuple | None) -> dict | None:
    """The group at `path` (("overall",) or (section, name)); None for section titles."""
    if path is None:
        return None
    return score[path[0]] if len(path) == 1 else score[path[0]].get(path[1])


def _spend_rows(spends: list[dict]) -> list[list[str]]:
    fields = (("answers", "answers", "{:,}"), ("prompt tokens", Col.PROMPT_TOKENS, "{:,}"),
              ("output tokens", Col.OUTPUT_TOKENS, "{:,}"), ("visual tokens used", Col.VISUAL_TOKENS_USED, "{:,}"),
              ("total FLOPs", Col.TOTAL_FLOPS, "{:.3e}"), ("total FLOPs native", Col.TOTAL_FLOPS_NATIVE, "{:.3e}"),
              ("mean attention FLOPs ratio", "mean_attn_flops_ratio", "{:.3f}"),
              ("mean frames", "mean_frames", "{:.1f}"))
    return [[f"  {label}", *("-" if s[key] is None else fmt.format(s[key]) for s in spends)]
            for label, key, fmt in fields]


def _notes(score: dict) -> list[str]:
    notes = []
    for key, title in (("unanswerable_by_reason", "unanswerable"), ("errors_by_reason", "errors")):
        if score[key]:
            notes.append(f"{title}: " + ", ".join(f"{reason} {n}" for reason, n in score[key].items()))
    if score["rows_not_in_questions"]:
        notes.append(f"rows not in the question set: {score['rows_not_in_questions']}")
    return notes


def render_score(score: dict) -> str:
    """One run's score as text."""
    head = [f"answers: {score['output']}  runs: {', '.join(score['run_ids']) or '-'}  "
            f"models: {', '.join(score['models']) or '-'}  questions: {score['questions']}"]
    rows = [["", "accuracy", "n", "unanswerable", "errors", "missing"]]
    for label, path in _groups(score):
        g = _lookup(score, path)
        rows.append([label] + ([""] * 5 if g is None else
                               [_percent(g["accuracy"]), str(g["n"]), str(g["unanswerable"]), str(g["errors"]),
                                str(g["missing"])]))
    rows += [["spend", "", "", "", "", ""]] + [r + [""] * 4 for r in _spend_rows([score["spend"]])]
    return "\n".join(head + [_table(rows)] + _notes(score))


def render_comparison(first: dict, second: dict) -> str:
    """Two runs over the same question set side by side, with the change in accuracy (points)."""
    head = [f"A: {first['output']}  (runs: {', '.join(first['run_ids']) or '-'})",
            f"B: {second['output']}  (runs: {', '.join(second['run_ids']) or '-'})"]
    rows = [["", "A accuracy", "A n", "B accuracy", "B n", "B - A"]]
    for label, path in _groups(first):  # both runs are scored against the same question set
        a, b = _lookup(first, path), _lookup(second, path)
        if path is None:
            rows.append([label, "", "", "", "", ""])
            continue
        change = ("-" if not a or not b or a["accuracy"] is None or b["accuracy"] is None
                  else f"{100 * (b['accuracy'] - a['accuracy']):+.1f}")
        rows.append([label, _percent(a["accuracy"] if a else None), str(a["n"]) if a else "-",
                     _percent(b["accuracy"] if b else None), str(b["n"]) if b else "-", change])
    rows += [["spend", "A", "", "B", "", ""]]
    rows += [[r[0], r[1], "", r[2], "", ""] for r in _spend_rows([first["spend"], second["spend"]])]
    notes = [f"A {n}" for n in _notes(first)] + [f"B {n}" for n in _notes(second)]
    return "\n".join(head + [_table(rows)] + notes)
