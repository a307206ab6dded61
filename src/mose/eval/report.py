"""The `mose analyze` report: plots (matplotlib) and one self-contained HTML page.

`write_report` writes OUT/report.html (every image a base64 PNG data URI, CSS
inline, nothing fetched, so the file can be mailed or attached to a CI run)
and OUT/analysis.json (the same numbers, for scripts). Every part is
optional, so a demo can write a report of a methods table alone:

    write_report("runs/report", scores={"world test": {"methods": {
        "MoSE": {"accuracy": 61.0}, "MoE 4x1": {"accuracy": 48.5}}}})

Figures are drawn on `matplotlib.figure.Figure` objects, rendered by the Agg
canvas, never through pyplot: no global backend, no figures left open.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from mose.data.schema import atomic_path

if TYPE_CHECKING:  # analysis imports this module; it needs these names only for hints
    from mose.eval.analysis import LayerSimilarity, ModelAnalysis, RoutingStats

REPORT_FILE = "report.html"
JSON_FILE = "analysis.json"
THUMBNAIL = 256  # longest side of a sample image in the report, pixels
DPI = 100
ANNOTATE_MAX = 8  # write the numbers into heatmap cells up to this many rows


@dataclass(frozen=True)
class SampleView:
    """One sample as the report shows it."""

    id: str
    images: list[str]
    question: str
    choices: list[str] = field(default_factory=list)
    reference: str | None = None
    answer: str | None = None  # the prediction's answer
    verdict: str | None = None  # "correct"/"wrong", "exact match"/"differs"
    chain: str | None = None  # formatted skill chain
    chain_from: str | None = None  # "prediction" or "routers"
    label: str | None = None  # the labelled skills, formatted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table_html(table: Table) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in ["", *table.columns])
    body = "".join(
        "<tr><th>" + esc(label) + "</th>" + "".join(f"<td>{esc(cell(v))}</td>" for v in cells) + "</tr>"
        for label, cells in table.rows)
    return (f'<table><caption>{esc(table.title)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def figure_html(png: bytes, alt: str) -> str:
    return f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}"></figure>'


def _columns(parts: Sequence[str]) -> str:
    """Side by side when there are two (a model and its comparison), else stacked."""
    if len(parts) > 1:
        return '<div class="cols">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"
    return "".join(parts)


def header_html(title: str, sources: Mapping[str, str]) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd><code>{esc(v)}</code></dd>" for k, v in sources.items())
    return f"<header><h1>{esc(title)}</h1><dl>{rows}</dl></header>"


def scores_html(scores: Mapping[str, Mapping[str, Any]]) -> str:
    tables = [table_html(t) for name, data in scores.items() for t in score_tables(name, data)]
    return _section("scores", "Scores", "".join(tables))


def similarity_html(models: Sequence[ModelAnalysis]) -> str:
    vmin = similarity_floor(models)
    ncols = 2 if len(models) > 1 else 3
    rows = max((len(layer.labels) for m in models for layer in m.similarity), default=1)
    figures = [figure_html(similarity_figure(m.similarity, f"{m.name} ({_kind(m.kind)})", vmin, ncols, rows),
                           f"expert similarity of {m.name}") for m in models if m.similarity]
    table = Table("mean / min cosine similarity between routed experts (shared expert left out)",
                  [m.name for m in models], _similarity_rows(models))
    intro = ("<p>Cosine similarity of each MoE layer's experts, every expert's weights "
             "(<code>gate_up_proj</code>, <code>down_proj</code>) flattened to one vector. Upcycled "
             "experts start as copies of the dense FFN (similarity 1); the further below 1, the more "
             "training made them specialise.</p>")
    return _section("experts", "Expert diversity", intro + table_html(table) + _columns(figures))


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


def routing_html(models: Sequence[ModelAnalysis]) -> str:
    parts, notes = [], []
    for m in models:
        if m.routing is None:
            why = ("routes each token, not each sample, so it has no skill chains" if m.kind == "token_moe"
                   else "not routed")
            notes.append(f"<p class='note'>{esc(m.name)} ({esc(_kind(m.kind))}): {esc(why)}.</p>")
            continue
        stats = m.routing
        parts.append(f"<h3>{esc(m.name)}</h3>" + table_html(routing_table(stats))
                     + figure_html(distribution_figure(stats, "skills per level"), "skill distribution")
                     + (figure_html(confusion_figure(stats, "labelled vs chosen skill"), "confusion")
                        if stats.n_labelled else "<p class='note'>no sample is labelled.</p>"))
    intro = ("<p>The routers choose on their own (no labels reach the model); their choices are "
             "compared with the samples' skill labels.</p>")
    return _section("routing", "Routing", intro + _columns(parts) + "".join(notes))


def routing_table(stats: RoutingStats) -> Table:
    rows = [(lv.level, [_percent(lv.accuracy), lv.mean_prob, sum(lv.labelled)]) for lv in stats.levels]
    rows.append(("whole chain", [_percent(stats.chain_accuracy), None, stats.n_labelled]))
    return Table(f"router accuracy against labels ({stats.n} samples, {stats.n_labelled} labelled)",
                 ["accuracy", "mean prob of chosen", "labelled"], rows)


def _percent(fraction: float | None) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"


def samples_html(samples: Sequence[SampleView]) -> str:
    cards = "".join(_sample_card(s) for s in samples)
    return _section("samples", "Sample answers", f'<div class="cards">{cards}</div>')


def _sample_card(view: SampleView) -> str:
    images = []
    for path in view.images:
        uri = image_uri(path)
        images.append(f'<img src="{uri}" alt="{esc(Path(path).name)}">' if uri
                      else f'<p class="note">image not readable: {esc(path)}</p>')
    choices = "".join(f"<li>{esc(c)}</li>" for c in view.choices)
    rows = [("reference", view.reference)]
    verdict = f'<span class="badge {_badge(view.verdict)}">{esc(view.verdict)}</span>' if view.verdict else ""
    if view.answer is not None:
        rows.append(("answer", view.answer))
    if view.chain is not None:
        rows.append(("skill chain" + (" (routers)" if view.chain_from == "routers" else ""), view.chain))
    if view.label is not None:
        rows.append(("labelled skills", view.label))
    details = "".join(
        f"<dt>{esc(k)}</dt><dd>{'—' if v is None else esc(v)}{verdict if k == 'answer' else ''}</dd>"
        for k, v in rows)
    return (f'<article class="card"><div class="pics">{"".join(images)}</div><div class="text">'
            f'<p class="id">{esc(view.id)}</p><p class="q">{esc(view.question)}</p>'
            + (f'<ol type="A">{choices}</ol>' if choices else "")
            + f"<dl>{details}</dl></div></article>")


def _badge(verdict: str | None) -> str:
    return "good" if verdict in ("correct", "exact match") else "bad"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _kind(kind: str) -> str:
    return {"mose": "MoSE", "token_moe": "token MoE"}.get(kind, kind)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
 background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:20px 24px 48px}
header h1{margin:0 0 6px;font-size:24px}
header dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0;color:#4a5263}
header dt{font-weight:600}
header dd{margin:0}
nav{margin:12px 0 4px;font-size:13px}
nav a{margin-right:14px;color:#2b59c3;text-decoration:none}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:14px 18px;margin-top:18px}
h2{font-size:18px;margin:0 0 8px}
h3{font-size:15px;margin:14px 0 6px;word-break:break-all}
p{margin:6px 0}
.note{color:#6b7280;font-style:italic}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f3f6;padding:1px 4px;
 border-radius:3px}
table{border-collapse:collapse;margin:10px 16px 10px 0;font-size:13px;display:inline-table;
 vertical-align:top}
caption{text-align:left;font-weight:600;padding-bottom:4px;color:#374151}
th,td{border-bottom:1px solid #e5e7eb;padding:3px 10px;text-align:right;white-space:nowrap}
thead th{background:#f3f4f6}
tbody th{text-align:left;font-weight:500}
tbody tr:nth-child(even){background:#fafbfc}
figure{margin:8px 0}
figure img{max-width:100%;height:auto;display:block}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
.cols>div{min-width:0}
.cards{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.card{display:flex;gap:12px;border:1px solid #e5e7eb;border-radius:6px;padding:10px}
.pics img{width:160px;height:auto;border-radius:4px;display:block;margin-bottom:4px}
.text{min-width:0}
.id{font:11px ui-monospace,monospace;color:#6b7280;margin:0}
.q{font-weight:600}
.card ol{margin:2px 0 6px;padding-left:22px}
.card dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:4px 0 0}
.card dt{color:#6b7280}
.card dd{margin:0}
.badge{font-size:11px;border-radius:9px;padding:0 7px;margin-left:6px;white-space:nowrap}
.badge.good{background:#dcfce7;color:#166534}
.badge.bad{background:#fee2e2;color:#991b1b}
"""


def render_report(*, title: str = "mose analysis", models: Sequence[ModelAnalysis] = (),
                  scores: Mapping[str, Mapping[str, Any]] | None = None,
                  samples: Sequence[SampleView] = (), sources: Mapping[str, str] | None = None,
                  figures: Mapping[str, bytes] | None = None) -> str:
    """The report as one HTML string (what `write_report` writes)."""
    sections = []
    if scores:
        sections.append(("scores", "Scores", scores_html(scores)))
    if figures:
        body = "".join(f"<h3>{esc(name)}</h3>{figure_html(png, name)}" for name, png in figures.items())
        sections.append(("figures", "Figures", _section("figures", "Figures", body)))
    if models:
        sections.append(("experts", "Expert diversity", similarity_html(models)))
    if any(m.routing is not None for m in models):
        sections.append(("routing", "Routing", routing_html(models)))
    if samples:
        sections.append(("samples", "Sample answers", samples_html(samples)))
    nav = "".join(f'<a href="#{anchor}">{esc(name)}</a>' for anchor, name, _ in sections)
    body = "".join(part for _, _, part in sections) or "<p class='note'>nothing to report.</p>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"{header_html(title, sources or {})}<nav>{nav}</nav>{body}</main></body></html>\n")


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
