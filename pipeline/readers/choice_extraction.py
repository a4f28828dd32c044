"""Free-text answers to an option letter.

Models answer "B", "(b)", "B) a box", "The answer is C.", "Best option: (D", the option's text
instead of its letter, several letters, or nothing usable. `extract_choice` tries readings from
the most to the least explicit and takes the first that names letters; a reading that names more
than one letter makes the answer ambiguous rather than a guess, and an answer no reading fits is
unanswerable. Neither is counted right or wrong by the scorer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from freemoref.prompts import OPTION_LETTERS

# How a letter was found, most explicit first. NO_CHOICE and SEVERAL_CHOICES carry no letter.
WHOLE_ANSWER, LEADING_LETTER, STATED, BRACKETED, OPTION_TEXT, LONE_CAPITAL = (
    "whole_answer", "leading_letter", "stated", "bracketed", "option_text", "lone_capital")
NO_CHOICE, SEVERAL_CHOICES = "no_choice", "several_choices"

_WHOLE = re.compile(r"^\(?([A-Za-z])\s*[.):]?$")
# "B) ...", "(b) ...", "C. ...", "D: ..." or "B" alone on the first line; a bare capital followed
# by a word is not one ("A man ...").
_LEADING = re.compile(r"^\(?([A-Za-z])\s*[.):]|^([A-Z])(?=[ \t]*\n)")
_ALTERNATIVE = re.compile(r"^\s*(?:,|/|or\b|and\b)\s*\(?[A-Z](?![A-Za-z])")
# "answer is C", "Answer: (b)", "best option: D", "option B", "choice (C)".
# The keywords in any case, the letter case-sensitive unless marked: "is a man" is no letter.
_STATED = re.compile(
    r"\b(?i:answer|option|choice)(?:\s+is)?\s*:?\s*(?:(?i:option)\s+)?"
    r"(?:\(([A-Za-z])\)|\(?([A-Z])(?![A-Za-z'])|\(?([a-z])(?=[.):]|\s*$))")
_BRACKETED = re.compile(r"\(([A-Z])\)")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_WORDS = re.compile(r"[^\w]+")


@dataclass(frozen=True)
class Choice:
    letter: str | None  # None: no option could be read from the answer
    how: str


def _normalised(text: str) -> str:
    return _WORDS.sub(" ", text.lower()).strip()


def _option_text_letters(text: str, options: list[str]) -> set[str]:
    """Letters of the options whose text the answer is, or contains as whole words. An option
    contained in a longer matching option ("red" in "red car") gives way to it."""
    answer = f" {_normalised(text)} "
    found = {i: _normalised(o) for i, o in enumerate(options) if _normalised(o) and f" {_normalised(o)} " in answer}
    exact = [i for i, o in found.items() if answer.strip() == o]
    if exact:
        return {OPTION_LETTERS[exact[0]]}
    longest = {i for i, o in found.items() if not any(o != other and o in other for other in found.values())}
    return {OPTION_LETTERS[i] for i in longest}


def extract_choice(text: str | None, options: list[str]) -> Choice:
    """The option letter `text` picks among `options` (in letter order)."""
    valid = set(OPTION_LETTERS[:len(options)])
    text = (text or "").strip()
    if not text:
        return Choice(None, NO_CHOICE)

    def letters(matches) -> set[str]:
        return {next(g for g in m.groups() if g).upper() for m in matches} & valid

    whole = _WHOLE.match(text)
    readings = [(WHOLE_ANSWER, letters([whole] if whole else []))]
    leading = _LEADING.match(text)
    if leading and _ALTERNATIVE.match(text[leading.end():]):
        return Choice(None, SEVERAL_CHOICES)  # "(A) or (B)", "A, C"
    readings += [
        (LEADING_LETTER, letters([leading] if leading else [])),
        (STATED, letters(_STATED.finditer(text))),
        (BRACKETED, letters(_BRACKETED.finditer(text))),
        (OPTION_TEXT, _option_text_letters(text, options)),
        (LONE_CAPITAL, letters(_LONE_CAPITAL.finditer(text))),
    ]
    for how, found in readings:
        if len(found) == 1:
            return Choice(found.pop(), how)
        if len(found) > 1:
            return Choice(None, SEVERAL_CHOICES)
    return Choice(None, NO_CHOICE)
