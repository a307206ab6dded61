"""The predictions file: what `mose predict` writes and every scorer and report reads.

JSONL, one line per sample:

    {"id": "world/driving/test/3", "answer": "stop",
     "skill_chain": {"perception": {"skill": "vru", "prob": 0.91}, ...}}

`skill_chain` is null (or absent) for dense and token-MoE models. Other fields
are ignored, so a predictor may keep extras beside them. A malformed line or a
repeated id is an error naming the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mose.data.schema import DataError
from mose.routing import SkillChain


@dataclass(frozen=True)
class Prediction:
    id: str
    answer: str
    skill_chain: dict[str, dict[str, Any]] | None = None  # {level: {"skill": str, "prob": float}}

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "answer": self.answer, "skill_chain": self.skill_chain},
                          ensure_ascii=False)

    def skills(self) -> dict[str, str] | None:
        """The chain as {level: skill}, or None without a chain."""
        if self.skill_chain is None:
            return None
        return {level: choice["skill"] for level, choice in self.skill_chain.items()}


def chain_dict(chain: SkillChain) -> dict[str, dict[str, Any]]:
    """The JSON form of a skill chain: level → {"skill", "prob"}, levels in order."""
    return {c.level: {"skill": c.skill, "prob": round(c.prob, 4)} for c in chain.choices}


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
            prediction = parse_prediction(data, str(path), where)
            if prediction.id in out:
                raise DataError(str(path), where, "id", f"duplicate id {prediction.id!r} "
                                                        f"(first at line {first_line[prediction.id]})")
            out[prediction.id] = prediction
            first_line[prediction.id] = number
    return out


def parse_prediction(data: Any, source: str, where: str) -> Prediction:
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
