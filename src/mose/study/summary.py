"""From run results to the study's tables and figure: mean ± spread over seeds.

The spread is the sample standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from mose.eval.report import figure_png
from mose.study.config import StudyConfig
from mose.study.methods import METHODS
from mose.study.runs import RunSpec, default_labelled, main_run

Results = Mapping[RunSpec, dict[str, Any]]


def headline(bench: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a table shows for one run, first the one the study ranks by (in %, or CODA-LM's ×10)."""
    if bench == "world":
        levels = {level: cell["accuracy"] for level, cell in scores["by_level"].items()}
        chain = scores.get("routing", {}).get("chain")
        routing = {} if chain is None else {"routing chain": chain}
        return {"overall": scores["overall"], **levels, **routing}
    if bench == "coda-lm":  # a task whose judgments all failed has no score
        return {task: scores[task]["score_x10"] for task in ("average", "general", "region", "suggestion")
                if scores.get(task, {}).get("score_x10") is not None}
    return {"accuracy": scores["accuracy"]}  # robo2vlm, drivelm (exact match)


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], decimals: int = 1) -> str:
    if not values:
        return "—"
    mean, spread = mean_spread(values)
    return f"{mean:.{decimals}f} ± {spread:.{decimals}f}" if len(values) > 1 else f"{mean:.{decimals}f}"


def _over_seeds(results: Results, pick: Callable[[RunSpec], bool]) -> list[dict[str, Any]]:
    return [results[spec] for spec in sorted(results, key=lambda s: s.order) if pick(spec)]


def _metrics(bench: str, runs: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    """metric → its value in each run (metrics some runs lack are left out)."""
    rows = [headline(bench, run["scores"]) for run in runs]
    return {k: [row[k] for row in rows] for k in rows[0] if all(k in row for row in rows)} if rows else {}


def main_table(config: StudyConfig, results: Results) -> dict[str, dict[str, Any]]:
    """Per method: every headline metric, parameters and speed (the paper's Tables 1 and 2)."""
    table = {}
    for method in config.experiments.main.methods:
        runs = _over_seeds(results, lambda s, m=method: _is_main(config, s, m))
        table[METHODS[method].label] = {
            **{k: fmt(v) for k, v in _metrics(config.score, runs).items()},
            "trainable": f"{runs[0]['trainable_params']:,}", "active": f"{runs[0]['active_params']:,}",
            "tokens/s": fmt([r["tokens_per_s"] for r in runs], 0)}
    return table


def data_size_table(config: StudyConfig, results: Results) -> dict[str, dict[str, Any]]:
    """Per method, the ranking metric at each fraction of the answer data (the paper's Fig. 7)."""
    experiment = config.experiments.data_size
    return {METHODS[m].label: {f"{f:g} of the data": fmt(_ranking(config, results, m, f))
                               for f in experiment.fractions} for m in experiment.methods}


def data_size_figure(config: StudyConfig, results: Results) -> bytes:
    experiment = config.experiments.data_size
    figure = Figure(figsize=(5.2, 3.4))
    ax = figure.add_subplot()
    for method in experiment.methods:
        points = [(f, mean_spread(values)) for f in experiment.fractions
                  if (values := _ranking(config, results, method, f))]  # (fraction, (mean, sd))
        ax.errorbar([f for f, _ in points], [p[0] for _, p in points], yerr=[p[1] for _, p in points],
                    marker="o", capsize=3, label=METHODS[method].label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(experiment.fractions, [f"{f:g}" for f in experiment.fractions])
    ax.set_xlabel("fraction of the fine-tuning data")
    ax.set_ylabel(_ranking_name(config))
    ax.set_title(f"{config.name}: data size ({len(config.seeds)} seed(s), mean ± sd)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure_png(figure)


def skill_data_table(config: StudyConfig, results: Results) -> dict[str, dict[str, Any]]:
    """Per method and labelled-set size: all headline metrics (the paper's Table 3)."""
    experiment = config.experiments.skill_data
    table = {}
    for method in experiment.methods:
        for n in experiment.labelled:
            runs = _over_seeds(results, lambda s, m=method, n=n: s.method == m and s.fraction == 1.0 and
                               s.labelled == n)
            table[f"{METHODS[method].label}, {n:,} labelled"] = {
                k: fmt(v) for k, v in _metrics(config.score, runs).items()}
    return table


def diversity_table(config: StudyConfig, results: Results) -> dict[str, dict[str, Any]]:
    """Per method, the mean cosine similarity between its routed experts (the paper's Fig. 8)."""
    table = {}
    for method in config.experiments.diversity.methods:
        runs = _over_seeds(results, lambda s, m=method: _is_main(config, s, m))
        values = [r["expert_similarity"] for r in runs if r["expert_similarity"] is not None]
        table[METHODS[method].label] = {"expert similarity": fmt(values, 4)}  # "—": no routed experts
    return table


# The metric a study ranks runs by, per scorer: the data-size table and figure show it.
RANKED_BY = {"world": "overall", "coda-lm": "average"}  # else "accuracy"


def _ranking(config: StudyConfig, results: Results, method: str, fraction: float) -> list[float]:
    runs = _over_seeds(results, lambda s: s.method == method and s.fraction == fraction and
                       s.labelled == default_labelled(config, method))
    metric = RANKED_BY.get(config.score, "accuracy")
    # A CODA-LM run without an average (a task's judgments all failed) is left out,
    # never ranked by another metric.
    return [row[metric] for row in (headline(config.score, r["scores"]) for r in runs) if metric in row]


def _ranking_name(config: StudyConfig) -> str:
    return {"world": "overall accuracy %", "coda-lm": "average score (×10)"}.get(config.score, "accuracy %")


def _is_main(config: StudyConfig, spec: RunSpec, method: str) -> bool:
    """One of the method's main runs (all the data, the default labelled set)."""
    return spec == main_run(config, method, spec.seed)
