"""`mose analyze` as a library call: load the models and files, analyse, write the report.

The one module that imports both halves: `mose.eval.analysis` computes,
`mose.eval.report` renders. It sits on top (analysis <- report <- analyze), and
neither half imports it back.

    path = analyze("runs/train/mose/sft", "runs/analysis", compare_dir="runs/moe/sft",
                   data="runs/world/test.jsonl", predictions="runs/pred.jsonl",
                   scores=["runs/scores.json"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mose.data.schema import Sample, read_jsonl
from mose.eval.analysis import AnalysisError, ModelAnalysis, analyze_model, sample_views
from mose.eval.batching import check_batch_size
from mose.eval.predictions import Prediction, read_predictions
from mose.eval.report import write_report
from mose.models.device import resolve_placement
from mose.models.loading import is_converted, load_for_inference, model_type_of


@dataclass(frozen=True)
class AnalysisRun:
    """What `run_analysis` wrote, and the analyses behind it."""

    report: Path  # OUT/report.html; OUT/analysis.json beside it
    models: list[ModelAnalysis]


def analyze(model_dir: str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Analyse one model (or two, side by side) and write OUT/report.html and OUT/analysis.json.

    Takes `run_analysis`' options; returns the report's path.
    """
    return run_analysis(model_dir, out_dir, **options).report


def run_analysis(model_dir: str | Path, out_dir: str | Path, *, compare_dir: str | Path | None = None,
                 data: str | Path | None = None, predictions: str | Path | None = None,
                 scores: Sequence[str | Path] = (), max_samples: int = 8, batch_size: int = 8,
                 device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                 progress: bool = True, title: str = "mose analysis") -> AnalysisRun:
    """Analyse one model (or two, side by side) and write OUT/report.html and OUT/analysis.json.

    Args:
        model_dir, compare_dir: converted models (`mose train` stage directories,
            or anything `mose.models.loading.load_model` loads that is converted).
        data: labelled sample records (JSONL): routing statistics and probe
            ceilings of each MoSE model, and the samples the report shows.
        predictions: a predictions JSONL for `data` (`mose predict`): the answers
            and skill chains shown with the samples.
        scores: scores JSON files (`mose score`), one table per file.
        max_samples: how many samples the report shows.
        device, dtype: where and in what precision the models run (`auto`: the GPU in
            bfloat16 where there is one, else the CPU in float32; see `mose.models.device`).
    """
    placement = resolve_placement(device, dtype)  # a missing GPU fails before any work
    if predictions is not None and data is None:
        raise AnalysisError("predictions need --data: the samples they answer "
                            "(questions, images, references)")
    check_batch_size(batch_size)
    score_tables = load_scores(scores)  # before any slow work: a bad file fails fast
    samples = list(read_jsonl(data)) if data is not None else None
    answers = _load_predictions(predictions, samples, data) if predictions is not None else None
    analyses = []
    for spec in [model_dir] + ([compare_dir] if compare_dir is not None else []):
        spec = str(spec)
        model_type = model_type_of(spec)
        if model_type is not None and not is_converted(model_type):
            raise AnalysisError(f"{spec}: a dense {model_type} model has no experts to compare; analyze "
                                "a converted MoSE or token-MoE model (a `mose train` stage after convert)")
        model, processor = load_for_inference(spec, placement)
        analyses.append(analyze_model(model, processor, samples, name=spec,
                                      batch_size=batch_size, progress=progress, source=str(data)))
        del model  # one model in memory at a time
    views = sample_views(samples or [], answers, analyses[0].chains, max_samples)
    sources = {"model": str(model_dir), "compare": compare_dir, "data": data, "predictions": predictions}
    report = write_report(out_dir, title=title, models=analyses, scores=score_tables, samples=views,
                          sources={k: str(v) for k, v in sources.items() if v is not None})
    return AnalysisRun(report, analyses)


def load_scores(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Scores JSON files (as `mose score` writes them) by name (the file's stem, made unique)."""
    out: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise AnalysisError(f"{path}: no such scores file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AnalysisError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise AnalysisError(f"{path}: expected a JSON object of scores, got {type(data).__name__}")
        name, n = path.stem, 2
        while name in out:
            name, n = f"{path.stem} ({n})", n + 1
        out[name] = data
    return out


def _load_predictions(path: str | Path, samples: Sequence[Sample], data: str | Path) -> dict[str, Prediction]:
    found = read_predictions(path)
    if not any(s.id in found for s in samples):
        raise AnalysisError(f"{path}: none of its {len(found)} prediction ids are in {data}")
    return found
