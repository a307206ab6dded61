"""The demo's steps (a study of one seed: data, pretraining, labels, three methods), then its table,
sample answers with skill chains, OUT/results.json and OUT/report.html."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mose.data import Sample, read_jsonl
from mose.data.schema import atomic_path
from mose.demo.settings import DEMO_METHODS, DemoSettings
from mose.eval.chat import format_chain
from mose.eval.predictions import Prediction, read_predictions
from mose.eval.score.common import Pair
from mose.eval.score.world import level_of
from mose.study import StudyResults, run_study
from mose.study.methods import METHODS
from mose.study.run import STUDY_RESULTS_FILE
from mose.study.runs import run_dir

LEVELS = ("perception", "prediction", "planning")
console = Console()


def run_demo(out: str | Path, settings: DemoSettings) -> dict[str, Any]:
    """Run every step (finished ones are reused) and write OUT/results.json and OUT/report.html."""
    out = Path(out)
    begin = time.perf_counter()
    study = run_study(settings.study(out))
    methods = {method: _row(study, method) for method in DEMO_METHODS}
    results = {"methods": methods, "settings": settings.to_dict(), "routing": _routing(study),
               "seconds": round(time.perf_counter() - begin, 1)}
    # The study's results (tables, every run) stay in the file, beside the demo's own keys.
    path = out / STUDY_RESULTS_FILE
    with atomic_path(path) as temp:
        temp.write_text(json.dumps({**json.loads(path.read_text()), **results}, indent=2,
                                   ensure_ascii=False) + "\n")
    if not console.is_terminal:  # a log file: room for every column
        console.width = max(console.width, 120)
    test = list(read_jsonl(study.data.test))
    console.print(results_table(methods, len(test)))
    answers = {m: read_predictions(_run(study, m)[1] / "eval" / "predictions.jsonl") for m in DEMO_METHODS}
    show_answers(test, answers)
    console.print(f"wrote {path} and {study.report} in {time.perf_counter() - begin:.0f} s")
    return results


def _run(study: StudyResults, method: str) -> tuple[dict[str, Any], Path]:
    (spec,) = [s for s in study.runs if s.method == method]  # one seed, one data size
    return study.runs[spec], run_dir(study.config, spec)


def _row(study: StudyResults, method: str) -> dict[str, Any]:
    result, _ = _run(study, method)
    scores = result["scores"]
    return {"overall": scores["overall"],
            **{level: scores["by_level"].get(level, {}).get("accuracy") for level in LEVELS},
            "trainable_params": result["trainable_params"], "active_params": result["active_params"],
            "total_params": result["total_params"], "tokens_per_s": result["tokens_per_s"], "n": scores["n"]}


def _routing(study: StudyResults) -> dict[str, float]:
    """How often MoSE's skill chains on the test split agree with its labels: per level and whole."""
    routing = _run(study, "mose")[0]["scores"]["routing"]
    return {"chain": routing["chain"], **routing["by_level"]}


def results_table(methods: dict[str, dict[str, Any]], n: int) -> Table:
    table = Table("method", *LEVELS, "overall", "trainable", "active", "tokens/s",
                  title=f"test split of the driving world ({n} questions): accuracy %, parameters "
                        "(active: used per token), answer tokens/s")
    best = max(r["overall"] for r in methods.values())
    for method, row in methods.items():
        overall = f"{row['overall']:.1f}"
        overall = f"[bold]{overall}[/bold]" if row["overall"] == best else overall
        levels = (f"{row[lv]:.1f}" if row[lv] is not None else "—" for lv in LEVELS)
        table.add_row(METHODS[method].label, *levels, overall,
                      f"{row['trainable_params']:,}", f"{row['active_params']:,}",
                      f"{row['tokens_per_s']:.0f}")
    return table


def show_answers(test: list[Sample], predictions: dict[str, dict[str, Prediction]]) -> None:
    """One test question per level, every method's answer, and MoSE's skill chain."""
    mose = predictions["mose"]
    firsts = {}  # level → its first test question
    for sample in test:
        firsts.setdefault(level_of(Pair(sample, mose[sample.id])), sample)
    for sample in (firsts[level] for level in LEVELS if level in firsts):
        console.print(f"\n[bold]{sample.question}[/bold]  [dim]({sample.id}; "
                      f"reference: {sample.answer})[/dim]")
        for method, answers in predictions.items():
            console.print(f"  {METHODS[method].label:>16}: {answers[sample.id].answer}", highlight=False)
        console.print(f"  {'skill chain':>16}: {format_chain(mose[sample.id].skill_chain)}", highlight=False)
