"""The `mose analyze` report: plots (matplotlib) and one self-contained HTML page.

`write_report` writes OUT/report.html (every image a base64 PNG data URI, CSS
inline, nothing fetched, so the file can be mailed or attached to a CI run)
and OUT/analysis.json (the same numbers, for scripts). Every part is
optional, so a demo can write a report of a methods table alone:

    write_report("runs/report", scores={"world test": {"methods": {
        "MoSE": {"accuracy": 61.0}, "MoE 4x1": {"accuracy": 48.5}}}})

This module only renders: the numbers come from `mose.eval.analysis`. The page
is the jinja2 template templates/report.html.j2 (autoescaped: a sample's text
can hold any markup); Python prepares what it shows (tables, figures as data
URIs, sample cards). Figures are drawn on `matplotlib.figure.Figure` objects,
rendered by the Agg canvas, never through pyplot: no global backend, no
figures left open.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from mose.data.schema import atomic_path
from mose.eval.analysis import LayerSimilarity, ModelAnalysis, RoutingStats, SampleView

REPORT_FILE = "report.html"
JSON_FILE = "analysis.json"
THUMBNAIL = 256  # longest side of a sample image in the report, pixels
DPI = 100
ANNOTATE_MAX = 8  # write the numbers into heatmap cells up to this many rows


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def similarity_floor(models: Iterable[ModelAnalysis]) -> float:
    """One colour scale for every heatmap, so two models compare at a glance.

    From the lowest similarity (rounded down to a step that keeps small
    differences visible) to 1; all-copies (every value 1) shows on [0.9, 1].
    """
    values = [float(layer.matrix.min()) for m in models for layer in m.similarity]
    low = min(values, default=1.0)
    if low > 1.0 - 1e-9:
        return 0.9
    step = 10.0 ** math.floor(math.log10(max(1.0 - low, 1e-9)))  # the magnitude of the spread
    return max(-1.0, math.floor(low / step) * step)


def similarity_figure(layers: Sequence[LayerSimilarity], title: str, vmin: float = 0.0,
                      ncols: int = 3, rows: int | None = None) -> bytes:
    """Small multiples: one heatmap per MoE layer, titled with its index and level.

    `rows`: the matrix size the panels are sized for (default: this model's
    largest), so two models' figures can share one scale.
    """
    ncols = max(1, min(ncols, len(layers)))
    nrows = math.ceil(len(layers) / ncols)
    size = rows or max(len(layer.labels) for layer in layers)
    panel = 2.2 + 0.22 * size  # inches: room for the tick labels of bigger layers
    figure = Figure(figsize=(ncols * panel + 0.6, nrows * panel + 0.5), layout="constrained")
    axes = np.atleast_1d(figure.subplots(nrows, ncols, squeeze=False).ravel())
    image = None
    for ax, layer in zip(axes, layers, strict=False):
        image = ax.imshow(layer.matrix, vmin=vmin, vmax=1.0, cmap="viridis")
        ticks = range(len(layer.labels))
        ax.set_xticks(ticks, layer.labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(ticks, layer.labels, fontsize=7)
        ax.set_title(layer.title, fontsize=9)
        if len(layer.labels) <= ANNOTATE_MAX:
            _annotate(ax, layer.matrix, _decimals(vmin), vmin)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    figure.colorbar(image, ax=list(axes[:len(layers)]), shrink=0.8, label="cosine similarity")
    figure.suptitle(title, fontsize=10)
    return figure_png(figure)


def _decimals(vmin: float) -> int:
    """Enough decimals to tell apart values on a scale from vmin to 1."""
    spread = max(1.0 - vmin, 1e-9)
    return int(min(6, max(2, 1 - math.floor(math.log10(spread)))))


def _annotate(ax: Any, matrix: np.ndarray, decimals: int, vmin: float) -> None:
    middle = (vmin + 1.0) / 2
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.{decimals}f}", ha="center", va="center", fontsize=6.5 if decimals < 4 else 5,
                color="black" if value > middle else "white")


def distribution_figure(stats: RoutingStats, title: str) -> bytes:
    """Per level: samples per skill, as the routers chose and as labelled."""
    levels = stats.levels
    figure = Figure(figsize=(3.3 * len(levels), 2.9), layout="constrained")
    axes = figure.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels, strict=True):
        x = np.arange(len(level.skills))
        width = 0.4 if stats.n_labelled else 0.7
        ax.bar(x - (width / 2 if stats.n_labelled else 0), level.chosen, width, label="chosen",
               color="#4c72b0")
        if stats.n_labelled:
            ax.bar(x + width / 2, level.labelled, width, label="labelled", color="#dd8452")
        ax.set_xticks(x, level.skills, rotation=35, ha="right", fontsize=7)
        ax.set_title(level.level, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("samples", fontsize=8)
    axes[0].legend(fontsize=7, frameon=False)
    figure.suptitle(title, fontsize=10)
    return figure_png(figure)


def confusion_figure(stats: RoutingStats, title: str) -> bytes:
    """Per level: labelled skill (rows) against chosen skill (columns), coloured by row share."""
    levels = stats.levels
    figure = Figure(figsize=(3.3 * len(levels), 3.3), layout="constrained")
    axes = figure.subplots(1, len(levels), squeeze=False)[0]
    for ax, level in zip(axes, levels, strict=True):
        counts = np.array(level.confusion, dtype=float)  # (S, S)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # (S, S): recall per label
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        ticks = range(len(level.skills))
        ax.set_xticks(ticks, level.skills, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(ticks, level.skills, fontsize=7)
        ax.set_xlabel("chosen", fontsize=8)
        ax.set_title(level.level + ("" if level.accuracy is None else f" · {100 * level.accuracy:.0f}%"),
                     fontsize=9)
        for (i, j), value in np.ndenumerate(counts):
            if value:
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    axes[0].set_ylabel("labelled", fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure_png(figure)


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Any]]]  # (row label, cells)
    label: str = ""  # the heading of the row labels' column


def score_tables(name: str, scores: Mapping[str, Any]) -> list[Table]:
    """Any nested dict of numbers as readable tables.

    A `methods` entry ({method: {metric: value}}) is one table with a row per
    method. Everything else is cut into records (dicts whose values are all
    plain values); the records of one top-level key with the same fields make
    one table, a row per record: `by_level` {level: {accuracy, n}} is a table
    of levels, `by_skill` {level: {skill: {...}}} one of "level › skill" rows.
    """
    tables = []
    rest = dict(scores)
    methods = rest.pop("methods", None)
    if isinstance(methods, Mapping):
        tables.append(methods_table(name, methods))
    elif methods is not None:
        rest["methods"] = methods
    groups: dict[tuple[str, tuple[str, ...]], list[tuple[str, dict[str, Any]]]] = {}
    for path, record in _records(rest, ()):
        section = path[0] if path else ""
        label = " › ".join(path[1:]) or section or "all"
        groups.setdefault((section, tuple(record)), []).append((label, record))
    for (section, columns), rows in groups.items():
        title = f"{name} · {section}" if section else name
        if len(rows) == 1 and len(columns) > 6:  # one wide record reads better as key / value
            tables.append(Table(title, ["value"], [(k, [v]) for k, v in rows[0][1].items()]))
        else:
            tables.append(Table(title, list(columns), [(label, list(r.values())) for label, r in rows]))
    return tables


def methods_table(title: str, methods: Mapping[str, Any]) -> Table:
    """A row per method, a column per (flattened) metric."""
    flat = {method: dict(_flatten(metrics)) if isinstance(metrics, Mapping) else {"value": metrics}
            for method, metrics in methods.items()}
    columns = list(dict.fromkeys(key for metrics in flat.values() for key in metrics))
    return Table(title, columns, [(m, [metrics.get(c) for c in columns]) for m, metrics in flat.items()])


def _records(data: Mapping[str, Any], path: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], dict]]:
    plain = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    if plain:
        yield path, plain
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from _records(value, path + (str(key),))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix} › {key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _flatten(value, name)
        else:
            yield name, value


def cell(value: Any) -> str:
    """A number as it reads best: ints plain, floats with 2 decimals (4 when small), — for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_uri(path: str | Path, max_side: int = THUMBNAIL) -> str | None:
    """A sample image, downscaled, as a PNG data URI; None if it cannot be read."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
    except (FileNotFoundError, OSError):
        return None
    return data_uri(buffer.getvalue())


def similarity_view(models: Sequence[ModelAnalysis]) -> dict[str, Any]:
    """The expert-diversity section: a mean / min table and one heatmap figure per model."""
    vmin = similarity_floor(models)
    ncols = 2 if len(models) > 1 else 3
    rows = max((len(layer.labels) for m in models for layer in m.similarity), default=1)
    figures = [(data_uri(similarity_figure(m.similarity, f"{m.name} ({_kind(m.kind)})", vmin, ncols, rows)),
                f"expert similarity of {m.name}") for m in models if m.similarity]
    table = Table("mean / min cosine similarity between routed experts (shared expert left out)",
                  [m.name for m in models], _similarity_rows(models))
    return {"table": table, "figures": figures}


def _similarity_rows(models: Sequence[ModelAnalysis]) -> list[tuple[str, list[Any]]]:
    """A row per layer index (two models convert the same layers), "mean / min" per model."""
    by_layer = [{layer.layer: layer for layer in m.similarity} for m in models]
    rows = []
    for index in sorted({i for layers in by_layer for i in layers}):
        present = [layers[index] for layers in by_layer if index in layers]
        title = next((layer.title for layer in present if layer.level), present[0].title)
        cells = []
        for layers in by_layer:
            pairs = layers[index].routed_off_diagonal() if index in layers else np.empty(0)
            cells.append(f"{pairs.mean():.6f} / {pairs.min():.6f}" if pairs.size else "—")
        rows.append((title, cells))
    return rows


def routing_view(models: Sequence[ModelAnalysis]) -> dict[str, Any]:
    """The routing section: per routed model its table and figures; a note for each model not routed."""
    parts, notes = [], []
    for m in models:
        if m.routing is None:
            why = ("routes each token, not each sample, so it has no skill chains" if m.kind == "token_moe"
                   else "not routed")
            notes.append(f"{m.name} ({_kind(m.kind)}): {why}.")
            continue
        stats = m.routing
        parts.append({
            "name": m.name, "table": routing_table(stats), "probes": probe_note(stats),
            "distribution": data_uri(distribution_figure(stats, "skills per level")),
            "confusion": data_uri(confusion_figure(stats, "labelled vs chosen skill")) if stats.n_labelled
            else None})
    return {"parts": parts, "notes": notes}


def routing_table(stats: RoutingStats) -> Table:
    """Per level the router's accuracy beside its linear-probe ceiling; then the whole chain."""
    rows = [(lv.level, [_percent(lv.accuracy), _percent(lv.probe_accuracy), lv.mean_prob, sum(lv.labelled)])
            for lv in stats.levels]
    rows.append(("whole chain", [_percent(stats.chain_accuracy), None, None, stats.n_labelled]))
    return Table(f"router accuracy against labels ({stats.n} samples, {stats.n_labelled} labelled)",
                 ["router accuracy", "linear-probe ceiling", "chosen skill's mean probability", "labelled n"],
                 rows, label="level")


def probe_note(stats: RoutingStats) -> str | None:
    """Each probed layer's ceiling ("perception: layer 0 100.0%; ..."), None when nothing was probed."""
    parts = [f"{lv.level}: " + ", ".join(f"layer {i} {_percent(acc)}" for i, acc in lv.probe_by_layer.items())
             for lv in stats.levels if lv.probe_by_layer]
    return "; ".join(parts) or None


def _percent(fraction: float | None) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"


def sample_card(view: SampleView) -> dict[str, Any]:
    """A sample as its card shows it: images as data URIs (None: unreadable), then (field, value) rows."""
    rows: list[tuple[str, str | None]] = [("reference", view.reference)]
    if view.answer is not None:
        rows.append(("answer", view.answer))
    if view.chain is not None:
        rows.append(("skill chain" + (" (routers)" if view.chain_from == "routers" else ""), view.chain))
    if view.label is not None:
        rows.append(("labelled skills", view.label))
    return {"view": view, "rows": rows, "good": view.verdict in ("correct", "exact match"),
            "images": [(image_uri(path), Path(path).name, path) for path in view.images]}


def _kind(kind: str) -> str:
    return {"mose": "MoSE", "token_moe": "token MoE"}.get(kind, kind)


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("mose.eval", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["cell"] = cell
    return env.get_template("report.html.j2")


def render_report(*, title: str = "mose analysis", models: Sequence[ModelAnalysis] = (),
                  scores: Mapping[str, Mapping[str, Any]] | None = None,
                  samples: Sequence[SampleView] = (), sources: Mapping[str, str] | None = None,
                  figures: Mapping[str, bytes] | None = None) -> str:
    """The report as one HTML string (what `write_report` writes)."""
    routed = any(m.routing is not None for m in models)
    sections = {
        "scores": [t for name, data in (scores or {}).items() for t in score_tables(name, data)],
        "figures": [(name, data_uri(png)) for name, png in (figures or {}).items()],
        "experts": similarity_view(models) if models else None,
        "routing": routing_view(models) if routed else None,
        "samples": [sample_card(s) for s in samples],
    }
    return _template().render(title=title, sources=dict(sources or {}), **sections)


def write_report(out_dir: str | Path, *, title: str = "mose analysis", models: Sequence[ModelAnalysis] = (),
                 scores: Mapping[str, Mapping[str, Any]] | None = None, samples: Sequence[SampleView] = (),
                 sources: Mapping[str, str] | None = None,
                 figures: Mapping[str, bytes] | None = None) -> Path:
    """Write OUT/report.html and OUT/analysis.json (each atomically); return the report's path.

    Args:
        models: `ModelAnalysis` results (`mose.eval.analysis.analyze_model`); two are
            shown side by side.
        scores: name → a scores dict (`mose score`'s JSON; `{"methods": {name: {metric: value}}}`
            for a comparison of methods).
        samples: `SampleView`s (`mose.eval.analysis.sample_views`).
        sources: what was analysed (model paths, data, predictions), shown at the top.
        figures: title → PNG (`figure_png`), shown after the scores.
    """
    out_dir = Path(out_dir)
    numbers = {"title": title, "sources": dict(sources or {}), "models": [m.to_dict() for m in models],
               "scores": dict(scores or {}), "samples": [s.to_dict() for s in samples]}
    page = render_report(title=title, models=models, scores=scores, samples=samples, sources=sources,
                         figures=figures)
    with atomic_path(out_dir / JSON_FILE) as temp:
        temp.write_text(json.dumps(numbers, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report = out_dir / REPORT_FILE
    with atomic_path(report) as temp:
        temp.write_text(page, encoding="utf-8")
    return report
