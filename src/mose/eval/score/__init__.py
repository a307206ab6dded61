"""Benchmark scorers: predictions (JSONL) against sample records (JSONL) → a JSON-able dict.

    scores = score("robo2vlm", "runs/pred.jsonl", "runs/robo/test.jsonl")
    console.print(table("robo2vlm", scores))
    write_scores("runs/scores.json", scores)

Benches: `robo2vlm` (option accuracy, any multiple choice), `world` (the
procedural world: per level, per skill, routing agreement), `drivelm` (exact
match, BLEU/ROUGE-L/CIDEr), `coda-lm` (LLM judge; needs `judge_model` and
`judge_base_url`). The prediction and reference ids must match exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from mose.data.schema import atomic_path
from mose.eval.score import coda_lm, drivelm, robo2vlm, world
from mose.eval.score.common import Pair, ScoreError, load_pairs, match, read_references

BENCHES = ("robo2vlm", "world", "drivelm", "coda-lm")
_MODULES = {"robo2vlm": robo2vlm, "world": world, "drivelm": drivelm, "coda-lm": coda_lm}
JUDGE_OPTIONS = ("judge_model", "judge_base_url", "api_key_env", "cache_dir", "workers", "timeout_s",
                 "max_retries", "backoff_s", "parse_retries", "abort_after", "protocol", "coda_lm_repo")


def score(bench: str, predictions_path: str | Path, references_path: str | Path,
          progress: bool = False, **judge_options: Any) -> dict[str, Any]:
    """Score a prediction file against a reference file.

    Judge options (used by `coda-lm`, ignored by the others; None means the default):
    judge_model, judge_base_url (both required for coda-lm), api_key_env ("OPENAI_API_KEY"),
    cache_dir (default: `judge-cache/` beside the predictions), workers (8), timeout_s (60),
    max_retries (4), backoff_s (1.0), parse_retries (1), abort_after (20), protocol ("mose", or
    "official": the official scripts' requests, read from coda_lm_repo, a clone of CODA-LM).
    """
    if bench not in BENCHES:
        raise ScoreError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHES)}")
    unknown = set(judge_options) - set(JUDGE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; judge options: {', '.join(JUDGE_OPTIONS)}")
    settings = _judge_settings(predictions_path, judge_options) if bench == "coda-lm" else None
    pairs = load_pairs(predictions_path, references_path)
    if settings is not None:
        return coda_lm.score(pairs, settings, progress=progress)
    return _MODULES[bench].score(pairs)


def _judge_settings(predictions_path: str | Path, options: dict[str, Any]) -> coda_lm.JudgeSettings:
    given = {k: v for k, v in options.items() if v is not None}
    model, base_url = given.pop("judge_model", None), given.pop("judge_base_url", None)
    if not model or not base_url:
        raise ScoreError("coda-lm is scored by an LLM judge: give the judge model and its base URL "
                         "(judge_model, judge_base_url; the key is read from $OPENAI_API_KEY or api_key_env)")
    given.setdefault("cache_dir", Path(predictions_path).parent / "judge-cache")
    return coda_lm.JudgeSettings(model=model, base_url=base_url, **given)


def table(bench: str, scores: dict[str, Any]) -> Table:
    """A rich Table of one bench's scores, for printing."""
    if bench not in BENCHES:
        raise ScoreError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHES)}")
    return _MODULES[bench].table(scores)


def write_scores(path: str | Path, scores: dict[str, Any]) -> Path:
    """Write scores as JSON atomically: a file that exists is complete."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


__all__ = ["BENCHES", "JUDGE_OPTIONS", "Pair", "ScoreError", "load_pairs", "match", "read_references",
           "score", "table", "write_scores"]
