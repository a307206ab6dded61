"""The demo's steps, in order, each ending in one summary line; then the table and the report."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mose.data import Sample, read_jsonl
from mose.demo.data import DemoData, annotate_subset, make_data
from mose.demo.measure import Evaluation, active_params, evaluate, trainable_params
from mose.demo.recipes import LABELS, METHODS, final_model, method_recipe, pretrain_recipe
from mose.demo.settings import DemoSettings
from mose.eval.analysis import ModelAnalysis, analyze_model, sample_views
from mose.eval.chat import format_chain
from mose.eval.predictions import Prediction, read_predictions
from mose.eval.report import write_report
from mose.eval.score.common import Pair
from mose.eval.score.world import level_of
from mose.models.loading import load_model
from mose.train import train

LEVELS = ("perception", "prediction", "planning")
console = Console()


@contextmanager
def step(number: int, title: str) -> Iterator[dict[str, str]]:
    """A numbered step: a header, then one summary line (what the body put in `done["line"]`)."""
    console.rule(f"[bold]{number}. {title}")
    done = {"line": ""}
    begin = time.perf_counter()
    yield done
    console.print(f"[green]✓[/green] {done['line']} [dim]({time.perf_counter() - begin:.0f} s)[/dim]")


def run_demo(out: str | Path, settings: DemoSettings) -> dict[str, Any]:
    """Run every step (finished ones are reused) and write OUT/results.json and OUT/report.html."""
    out = Path(out)
    begin = time.perf_counter()
    s = settings
    _claim(out, s)
    with step(1, "the procedural driving world") as done:
        data = make_data(out / "data", s.pretrain_samples, s.train_samples, s.test_samples, s.seed)
        done["line"] = (f"{s.pretrain_samples} scene descriptions (pretraining), {s.train_samples} "
                        f"questions (fine-tuning), {s.test_samples} test questions: three disjoint splits")
    with step(2, "pretraining a general model on scene descriptions") as done:
        metrics = train(pretrain_recipe(out, data, s), resume=True)["pretrain"]
        done["line"] = f"dense tiny Qwen2-VL, {s.pretrain_steps} steps{_loss(metrics)}; never saw a question"
    with step(3, "skill labels for a small subset, from the shipped rules") as done:
        annotation = annotate_subset(data.train, data.labelled, s.labelled, s.seed)
        done["line"] = (f"rules {annotation.rules!r} labelled {annotation.samples} of {s.train_samples} "
                        f"training questions; they agree with the world's ground truth on "
                        f"{annotation.agreement:.1%} of levels")
    for method in METHODS:
        with step(4, f"fine-tuning {LABELS[method]} from the pretrained model") as done:
            results = train(method_recipe(method, out, data, s), resume=True)
            done["line"] = (f"{LABELS[method]}: {s.steps} steps at lr {s.lr:g}, batch {s.batch_size}"
                            f"{_loss(results['sft'])}{_router(results.get('router'))}")
    test = list(read_jsonl(data.test))
    methods, analyses, predictions = {}, {}, {}
    for method in METHODS:
        with step(5, f"answering the test split with {LABELS[method]}") as done:
            model, processor = load_model(str(final_model(out, method)))
            evaluation = evaluate(model, processor, test, data.test, out / "eval" / method, s.max_new_tokens,
                                  s.batch_size)
            methods[method] = _row(model, method, evaluation)
            predictions[method] = read_predictions(out / "eval" / method / "predictions.jsonl")
            if method != "dense_sft":  # expert similarity (and MoSE's routing) for the report
                analyses[method] = analyze_model(model, processor, test, name=LABELS[method],
                                                 batch_size=s.batch_size, source=str(data.test))
            done["line"] = (f"{LABELS[method]}: {methods[method]['overall']:.1f}% overall, "
                            f"{methods[method]['tokens_per_s']:.0f} answer tokens/s")
            del model
    results = {"methods": methods, "settings": s.to_dict(),
               "routing": _routing(analyses.get("mose")), "seconds": round(time.perf_counter() - begin, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not console.is_terminal:  # a log file: room for every column
        console.width = max(console.width, 120)
    console.print(results_table(methods, len(test)))
    show_answers(test, predictions)
    report = write_report(out, title="mose demo: MoSE vs token MoE vs dense SFT",
                          models=list(analyses.values()),
                          scores={"test split": {"methods": {LABELS[m]: r for m, r in methods.items()}}},
                          samples=sample_views(test, predictions["mose"], limit=6),
                          sources=_sources(out, data))
    console.print(f"wrote {out / 'results.json'} and {report} in {time.perf_counter() - begin:.0f} s")
    return results


def _claim(out: Path, settings: DemoSettings) -> None:
    """Reuse only a run of the same settings: data, models and answers all depend on them."""
    path = out / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings.to_dict():
        raise ValueError(f"{out} holds a demo run with other settings ({path}; --quick and the default "
                         "differ): choose another --out or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")


def _loss(metrics: dict[str, Any] | None) -> str:
    loss = (metrics or {}).get("loss")
    return f", final loss {loss:.3f}" if isinstance(loss, float) else " (reused)"


def _router(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return ""
    loss = metrics.get("loss")
    return f"; routers pretrained first (loss {loss:.3f})" if isinstance(loss, float) else ""


def _row(model: Any, method: str, evaluation: Evaluation) -> dict[str, Any]:
    by_level = evaluation.scores["by_level"]
    return {"overall": evaluation.scores["overall"],
            **{level: by_level.get(level, {}).get("accuracy") for level in LEVELS},
            "trainable_params": trainable_params(model, method), "active_params": active_params(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": round(evaluation.tokens_per_s, 1), "n": evaluation.scores["n"]}


def _routing(analysis: ModelAnalysis | None) -> dict[str, Any] | None:
    """MoSE's routers on the labelled test split: accuracy per level and of whole chains."""
    if analysis is None or analysis.routing is None:
        return None
    stats = analysis.routing
    return {"chain_accuracy": stats.chain_accuracy,
            **{lv.level: lv.accuracy for lv in stats.levels}}


def results_table(methods: dict[str, dict[str, Any]], n: int) -> Table:
    table = Table("method", *LEVELS, "overall", "trainable", "active", "tokens/s",
                  title=f"test split of the driving world ({n} questions): accuracy %, parameters "
                        "(active: used per token), answer tokens/s")
    best = max(r["overall"] for r in methods.values())
    for method, row in methods.items():
        overall = f"{row['overall']:.1f}"
        overall = f"[bold]{overall}[/bold]" if row["overall"] == best else overall
        levels = (f"{row[lv]:.1f}" if row[lv] is not None else "—" for lv in LEVELS)
        table.add_row(LABELS[method], *levels, overall,
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
            console.print(f"  {LABELS[method]:>16}: {answers[sample.id].answer}", highlight=False)
        console.print(f"  {'skill chain':>16}: {format_chain(predictions['mose'][sample.id].skill_chain)}",
                      highlight=False)


def _sources(out: Path, data: DemoData) -> dict[str, str]:
    return {"models": ", ".join(str(final_model(out, m)) for m in METHODS),
            "pretrained": str(out / "pretrain" / "pretrain"), "test data": str(data.test),
            "router labels": str(data.labelled)}
