"""Which option a multiple-choice answer names, parsed strictly.

Accepted (letters up to the number of choices, any case):

- a lone letter, bare or wrapped: "B", "b", "B.", "(b)", "[B]", "**B**";
- a letter opening the answer with a delimiter, then text: "B) red cube", "B. red cube";
- a letter after a cue: "Answer: B", "The answer is B", "Option (C)", "The correct choice is B,
  because ..." (after a cue an upper-case letter may be followed by plain text);
- the exact text (normalised: case, whitespace, trailing punctuation) of exactly one choice:
  a model that answers "Yes" to options [Yes, No, ...] chose A.

Refused, and counted as unparsable: several different letters ("Both A and C", "A or B",
"(A) or (B)", "A. The answer is B"), a letter with no delimiter and no cue ("A cup is
closest": never the first capital of a sentence), a letter past the last choice, and
anything else. A letter followed by text naming another option ("B) ... or C") is
ambiguous too, unless that text is exactly the choice's own text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mose.eval.score.common import normalize

LETTERS = "ABCDEFGHIJ"  # as `mose.data.collate` letters the options

# A letter token at the start of the text: (B), [B], or a bare B not inside a word.
_TOKEN = re.compile(r"\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])(?![\w'])")
# Cues before a letter: at the start ("Option B", "Answer: B", "The correct answer is B") ...
_LEADING_CUE = re.compile(r"(?:the\s+)?(?:correct\s+|right\s+|best\s+|final\s+)?(?:answer|option|choice)"
                          r"(?:\s+is)?\s*[:\-]?\s*|i\s+(?:choose|pick|select)\s+", re.I)
# ... or anywhere ("So the answer is B", "my answer: B").
_INNER_CUE = re.compile(r"\b(?:answer|option|choice)\s+is\s*:?\s*|\banswer\s*:\s*", re.I)
# Another option named after the chosen one: "(C)", "C)", "C.", "and C", "C or", "C, D", "C".
_OTHER = (r"\(\s*{L}\s*\)|\b{L}[.)](?:\s|$)|\b(?:and|or|&)\s+\(?{L}\b|\b{L}\s+(?:and|or|&)\b"
          r"|\b{L}\s*,\s*[A-J]\b|^{L}$")


def parse_choice(answer: str, choices: Sequence[str]) -> int | None:
    """The 0-based index of the option the answer names, or None if it names none or several."""
    text = answer.strip().strip("*`\"' ").strip()
    found = set()
    for rest, cued in _candidates(text):
        index = _letter(rest, choices, cued)
        if index is not None:
            found.add(index)
    if len(found) == 1:
        return found.pop()
    if found:
        return None  # different letters: ambiguous
    return _by_text(text, choices)


def _candidates(text: str) -> list[tuple[str, bool]]:
    """Where a letter may start: the text itself, and right after each cue."""
    out = [(text, False)]
    leading = _LEADING_CUE.match(text)
    if leading and leading.end() > 0:
        out.append((text[leading.end():], True))
    out += [(text[m.end():], True) for m in _INNER_CUE.finditer(text)]
    return out


def _letter(text: str, choices: Sequence[str], cued: bool) -> int | None:
    match = _TOKEN.match(text)
    if not match:
        return None
    bracketed = match.group(3) is None
    char = next(g for g in match.groups() if g)
    after = text[match.end():]
    if after and not bracketed:
        delimited = re.match(r"[.):,](?:\s|$)", after)
        if delimited:
            after = after[1:]
        elif not (cued and char.isupper() and after[0].isspace()):
            return None  # "A cup ...": a word, not an option
    elif after and not (after[0].isspace() or after[0] in ".:,"):
        return None
    index = ord(char.upper()) - ord("A")
    if index >= len(choices):
        return None
    tail = after.strip(" .:,)")
    if tail and normalize(tail) != normalize(choices[index]) and _names_other(tail, index, len(choices)):
        return None
    return index


def _names_other(tail: str, index: int, n: int) -> bool:
    others = "".join(LETTERS[i] for i in range(min(n, len(LETTERS))) if i != index)
    if not others:
        return False
    return re.search(_OTHER.format(L=f"[{others}]"), tail) is not None


def _by_text(text: str, choices: Sequence[str]) -> int | None:
    """An answer that is exactly one choice's text names that choice."""
    wanted = normalize(text)
    hits = [i for i, choice in enumerate(choices) if normalize(choice) == wanted]
    return hits[0] if len(hits) == 1 else None
