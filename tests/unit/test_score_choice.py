"""The strict option-letter parser: every verdict below was decided by hand."""

import pytest

from mose.eval.score.choice import parse_choice

CHOICES = ["red cube", "blue ball", "green cup", "yellow cube", "None of the above"]  # A..E


@pytest.mark.parametrize("answer, expected", [
    ("B", 1), ("b", 1), ("B.", 1), ("(b)", 1), ("[B]", 1), ("**B**", 1), (" C ", 2),
    ("Answer: B", 1), ("answer: e", 4), ("The answer is B", 1), ("The answer is B.", 1),
    ("So the correct answer is (D) yellow cube", 3), ("Option (C)", 2), ("I choose D", 3),
    ("The correct choice is B, because the ball is blue", 1),
    ("B) blue ball", 1), ("B. blue ball", 1), ("B. anything the model adds", 1),
    ("blue ball", 1), ("Blue  Ball.", 1), ("none of the above", 4),  # the text of one choice
])
def test_accepted(answer, expected):
    assert parse_choice(answer, CHOICES) == expected


@pytest.mark.parametrize("answer", [
    "Both A and C",          # two options
    "A or B", "(A) or (B)", "A, C",
    "A. The answer is B",    # two different letters
    "B) blue ball or C",     # another option named after the letter
    "A cup is on the left",  # never the first capital letter of a sentence
    "The answer is a cup",   # lower-case article after a cue is a word, not an option
    "I think it is B",       # no cue, no delimiter: not strict enough
    "F", "(G)",              # past the last choice
    "cube", "", "Answer:",   # no option at all (and "cube" is in two choices)
])
def test_refused(answer):
    assert parse_choice(answer, CHOICES) is None


def test_a_choice_whose_text_holds_letters_is_still_readable():
    choices = ["Yes", "No", "Both A and C", "Neither"]
    assert parse_choice("Both A and C", choices) == 2  # exactly that choice's text
    assert parse_choice("C. Both A and C", choices) == 2  # the letter, then its own text
    assert parse_choice("Yes", choices) == 0
    assert parse_choice("E", choices) is None  # only four options
