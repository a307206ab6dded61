"""What every scorer shares: matching predictions (`mose.eval.predictions`) to the
references, answer normalisation, and percentages.

A score is only computed when the ids of the predictions and the references are
exactly the same set: a missing or a stray prediction would silently change it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mose.data.schema import DataError, Sample, read_jsonl
from mose.eval.predictions import Prediction, read_predictions


class ScoreError(ValueError):
    """Predictions and references that cannot be scored together (ids, missing answers)."""


@dataclass(frozen=True)
class Pair:
    """One reference sample and the prediction for it."""

    sample: Sample
    prediction: Prediction


def read_references(path: str | Path) -> list[Sample]:
    """The sample records, refusing a repeated id (it would be scored twice)."""
    samples = list(read_jsonl(path))
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise DataError(str(path), sample.id, "id", "duplicate id in the references")
        seen.add(sample.id)
    if not samples:
        raise DataError(str(path), None, None, "no records to score against")
    return samples


def match(predictions: dict[str, Prediction], references: list[Sample],
          predictions_path: str | Path = "predictions", references_path: str | Path = "references",
          ) -> list[Pair]:
    """Pairs in reference order; any id in one file and not the other is an error."""
    ref_ids = {s.id for s in references}
    stray = [i for i in predictions if i not in ref_ids]
    if stray:
        raise ScoreError(f"{predictions_path}: {len(stray)} prediction id(s) are not in "
                         f"{references_path}, e.g. {_examples(stray)}")
    missing = [s.id for s in references if s.id not in predictions]
    if missing:
        raise ScoreError(f"{predictions_path}: {len(missing)} of {len(references)} reference sample(s) "
                         f"in {references_path} have no prediction, e.g. {_examples(missing)}")
    return [Pair(s, predictions[s.id]) for s in references]


def load_pairs(predictions_path: str | Path, references_path: str | Path) -> list[Pair]:
    """Read both files and match them: what every scorer starts from."""
    return match(read_predictions(predictions_path), read_references(references_path),
                 predictions_path, references_path)


def require_answer(pair: Pair) -> str:
    """The reference answer; a test split without answers cannot be scored."""
    if pair.sample.answer is None:
        raise ScoreError(f"reference {pair.sample.id!r}, field 'answer': null; "
                         "scoring needs references with answers")
    return pair.sample.answer


def _examples(ids: Iterable[str], k: int = 3) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (", ..." if len(ids) > k else "")


_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.,;:!?]+$")


def normalize(text: str) -> str:
    """For exact match: lower case, whitespace collapsed, trailing punctuation dropped.

    "Slow down and yield." == "slow  down and YIELD"; inner punctuation stays
    ("change lane, then stop" is not "change lane then stop").
    """
    return _TRAILING.sub("", _SPACE.sub(" ", text.strip().lower()))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def percent(hits: int, n: int) -> float | None:
    """100 * hits / n, rounded for reading; None when nothing was counted."""
    return round(100.0 * hits / n, 4) if n else None


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: a number or an em dash for nothing measured."""
    return "—" if value is None else f"{value:.{digits}f}"
