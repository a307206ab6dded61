"""From run results to the study's tables and figure: mean ± spread over seeds.

The spread is the sample standard deviation over seeds (0 with one seed).

Beside every MoSE row the main table shows how well it routes, in %: on the test
split after fine-tuning, how often the answers' skill chains pick the labelled
skill (`routing <level>`, `routing chain`); after the router stage, on its
held-out labelled split, the routers' own accuracy (`router <level>`, `router
chain`) and the ceiling a linear probe fitted on the same pooled inputs reaches
(`probe <level>`). "—" where a method has no routers (or the oracle, none that
choose). The oracle's row (†) reads the test labels: an upper bound, not a result.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from mose.eval.report import figure_png
from mose.skills.taxonomy import load_taxonomy
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
    """Per method: every headline metric, routing accuracy (MoSE methods), parameters and speed
    (the paper's Tables 1 and 2)."""
    methods = config.experiments.main.methods
    levels = load_taxonomy(config.taxonomy).level_names if any(METHODS[m].mose for m in methods) else ()
    table = {}
    for method in methods:
        runs = _over_seeds(results, lambda s, m=method: _is_main(config, s, m))
        scores = {k: fmt(v) for k, v in _metrics(config.score, runs).items() if k != "routing chain"}
        table[METHODS[method].label] = {
            **scores, **(routing_cells(runs if METHODS[method].mose else [], levels) if levels else {}),
            "trainable": f"{runs[0]['trainable_params']:,}", "active": f"{runs[0]['active_params']:,}",
            "tokens/s": fmt([r["tokens_per_s"] for r in runs], 0)}
    return table


def routing_cells(runs: Sequence[dict[str, Any]], levels: Sequence[str]) -> dict[str, str]:
    """Routing accuracy in % over the runs (see the module docstring); "—" where a run lacks it."""
    columns: dict[str, list[float | None]] = {}
    for key in [*levels, "chain"]:
        columns[f"routing {key}"] = [_test_routing(run, key) for run in runs]
    for key in [*levels, "chain"]:
        columns[f"router {key}"] = [_router_stage(run, f"router_acc/{key}") for run in runs]
    for key in levels:
        columns[f"probe {key}"] = [_router_stage(run, f"probe_acc/{key}") for run in runs]
    return {name: fmt(_all_or_none(values)) for name, values in columns.items()}


def _test_routing(run: dict[str, Any], key: str) -> float | None:
    """The answers' agreement with the test labels (a level, or "chain"), in %."""
    # A result measured before `routing` was kept: the world scorer's count, the same one.
    routing = run.get("routing") or run["scores"].get("routing") or {}
    return routing.get("chain") if key == "chain" else routing.get("by_level", {}).get(key)


def _router_stage(run: dict[str, Any], metric: str) -> float | None:
    """A held-out metric of the run's router stage (kept as a fraction), in %."""
    fraction = (run.get("router") or {}).get(metric)
    return None if fraction is None else 100.0 * fraction


def _all_or_none(values: Sequence[float | None]) -> list[float]:
    """Every seed's value, or none at all: a mean over some seeds would pass for all of them."""
    return [] if any(v is None for v in values) else list(values)


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
    """Per method, the mean cosine similarity between its routed experts that the test split reached
    (the paper's Fig. 8), and how many routed experts it never reached."""
    table = {}
    for method in config.experiments.diversity.methods:
        runs = _over_seeds(results, lambda s, m=method: _is_main(config, s, m))
        values = [r["expert_similarity"] for r in runs if r["expert_similarity"] is not None]
        never = _all_or_none([r.get("never_routed_experts") for r in runs])
        experts = {r.get("routed_experts") for r in runs}
        of = f" of {experts.pop():,}" if never and len(experts) == 1 else ""
        table[METHODS[method].label] = {"expert similarity": fmt(values, 4),  # "—": no routed experts
                                        "never routed": fmt(never, 0 if len(set(never)) == 1 else 1) + of}
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
