"""What every scorer shares: the prediction file, matching it to the references,
answer normalisation, and percentages.

A prediction file is JSONL, one line per sample:

    {"id": "world/driving/test/3", "answer": "stop",
     "skill_chain": {"perception": {"skill": "vru", "prob": 0.91}, ...}}

`skill_chain` may be null or absent (a dense model has none). Other fields are
ignored, so a predictor may keep extras (timings, the raw generation) beside them.
A score is only computed when the ids of the predictions and the references are
exactly the same set: a missing or a stray prediction would silently change it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mose.data.schema import DataError, Sample, read_jsonl


class ScoreError(ValueError):
    """Predictions and references that cannot be scored together (ids, missing answers)."""


@dataclass(frozen=True)
class Prediction:
    id: str
    answer: str
    skill_chain: dict[str, dict[str, Any]] | None = None  # {level: {"skill": str, "prob": float}}

    def skills(self) -> dict[str, str] | None:
        """The chain as {level: skill}, or None without a chain."""
        if self.skill_chain is None:
            return None
        return {level: choice["skill"] for level, choice in self.skill_chain.items()}


@dataclass(frozen=True)
class Pair:
    """One reference sample and the prediction for it."""

    sample: Sample
    prediction: Prediction


def read_predictions(path: str | Path) -> dict[str, Prediction]:
    """Predictions by id; a malformed line or a repeated id names the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such prediction file")
    out: dict[str, Prediction] = {}
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"at line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(str(path), where, None, f"malformed JSON: {error}") from None
            prediction = _prediction(data, str(path), where)
            if prediction.id in out:
                raise DataError(str(path), where, "id", f"duplicate id {prediction.id!r} "
                                                        f"(first at line {first_line[prediction.id]})")
            out[prediction.id] = prediction
            first_line[prediction.id] = number
    return out


def _prediction(data: Any, source: str, where: str) -> Prediction:
    if not isinstance(data, dict):
        raise DataError(source, where, None, f"expected a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("id"), str) or not data["id"]:
        raise DataError(source, where, "id", f"expected a non-empty string, got {data.get('id')!r}")
    where = f"{where} (id {data['id']!r})"
    if not isinstance(data.get("answer"), str):
        raise DataError(source, where, "answer", f"expected a string, got {data.get('answer')!r}")
    chain = data.get("skill_chain")
    if chain is not None:
        if not isinstance(chain, dict):
            raise DataError(source, where, "skill_chain",
                            f"expected {{level: {{skill, prob}}}} or null, got {chain!r}")
        for level, choice in chain.items():
            field = f"skill_chain.{level}"
            if not isinstance(choice, dict) or not isinstance(choice.get("skill"), str):
                raise DataError(source, where, field,
                                f"expected {{skill: str, prob: number}}, got {choice!r}")
            prob = choice.get("prob")
            if not isinstance(prob, int | float) or isinstance(prob, bool):
                raise DataError(source, where, f"{field}.prob", f"expected a number, got {prob!r}")
    return Prediction(id=data["id"], answer=data["answer"], skill_chain=chain)


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
