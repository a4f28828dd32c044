"""Free-text answers to option letters, on a table of tricky answers."""

import pytest

from pipeline.readers.choice_extraction import extract_choice

OPTIONS = ["The man opens the door", "A woman sits down", "red", "red car"]

TABLE = [
    # (answer, letter, how)
    ("B", "B", "whole_answer"),
    ("(B)", "B", "whole_answer"),
    ("b.", "B", "whole_answer"),
    ("(D", "D", "whole_answer"),  # after MLVU's "Best option: ("
    (" C) red ", "C", "leading_letter"),
    ("B. Because option A is wrong", "B", "leading_letter"),
    ("B\n\nExplanation: the red car is there", "B", "leading_letter"),
    ("The answer is C", "C", "stated"),
    ("The answer is C.", "C", "stated"),
    ("the answer is (d)", "D", "stated"),
    ("Answer: b", "B", "stated"),
    ("The best answer is: A", "A", "stated"),
    ("Best option: (D", "D", "stated"),
    ("Option B is correct because the man opens the door", "B", "stated"),
    ("The correct option is (b) since", "B", "stated"),
    ("I pick (C) here", "C", "bracketed"),
    ("The man opens the door", "A", "option_text"),
    ("A woman sits down.", "B", "option_text"),  # "A" is an article here, not a letter
    ("red car", "D", "option_text"),  # "red" is in it too; the whole option wins
    ("It is red.", "C", "option_text"),
    ("C is correct", "C", "lone_capital"),
    ("A and C", None, "several_choices"),
    ("(A) or (B)", None, "several_choices"),
    ("A, C", None, "several_choices"),
    ("A/B", None, "several_choices"),
    ("The answer is A or the answer is B", None, "several_choices"),
    ("I don't know", None, "no_choice"),  # "I" is not an option letter here
    ("The answer is a man opening it", None, "no_choice"),  # "a" is an article
    ("E", None, "no_choice"),  # past the last option
    ("", None, "no_choice"),
    (None, None, "no_choice"),
]


@pytest.mark.parametrize("answer,letter,how", TABLE)
def test_extract_choice(answer, letter, how):
    choice = extract_choice(answer, OPTIONS)
    assert (choice.letter, choice.how) == (letter, how)
