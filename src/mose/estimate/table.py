"""`mose estimate`: what each stage of a recipe needs per GPU, as a table and as one line."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mose.estimate.sharding import GPU_GB, STRATEGIES
from mose.estimate.stages import DEFAULT_ANSWER_TOKENS, StageEstimate, estimate_recipe
from mose.train.recipe import load_recipe

GIB = 2**30


def estimate_path(recipe_path: str | Path, gpus: int = 1, overrides: list[str] = (),
                  answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[StageEstimate]:
    """Load the recipe as `mose train` does (base and overrides included) and estimate it."""
    return estimate_recipe(load_recipe(recipe_path, list(overrides)), gpus, answer_tokens)


def estimate_table(recipe_path: str | Path, gpus: int = 1, overrides: list[str] = (),
                   answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> Table:
    """The table `mose estimate` prints: one row per stage and strategy."""
    estimates = estimate_path(recipe_path, gpus, overrides, answer_tokens)
    return render(estimates, f"{recipe_path} on {gpus} GPU(s)")


def render(estimates: list[StageEstimate], title: str) -> Table:
    table = Table(title=title, caption="GiB per GPU; activations per micro-batch "
                  "(with gradient checkpointing where the stage turns it on). "
                  "Fits: with 1 GiB CUDA context and 10% allocator slack.")
    for column in ("stage", "params total / trainable / active", "micro-batch", "strategy", "weights",
                   "grads", "AdamW", "activations", "per GPU", *(f"{g} GB" for g in GPU_GB)):
        table.add_column(column, justify="left" if column in ("stage", "strategy") else "right")
    for e in estimates:
        for i, gpu in enumerate(e.gpus):
            first = i == 0
            table.add_row(
                e.name if first else "",
                f"{e.total / 1e9:.3f}B / {e.trainable / 1e6:,.1f}M / {e.active / 1e9:.3f}B" if first else "",
                _shape(e) if first else "", gpu.strategy, _gib(gpu.weights), _gib(gpu.gradients),
                _gib(gpu.optimizer), _gib(gpu.activations), _gib(gpu.total),
                *("✓" if gpu.fits(g) else "✗" for g in GPU_GB), end_section=i == len(e.gpus) - 1)
    notes = sorted({n for e in estimates for n in e.notes})
    if notes:
        table.caption += "\n" + "\n".join(f"note: {n}" for n in notes)
    return table


def _shape(e: StageEstimate) -> str:
    if e.shape is None:
        return "–"
    ckpt = ", ckpt" if e.checkpointing else ""
    return f"{e.shape.batch} × {e.shape.seq} ({e.shape.image_tokens} img){ckpt}"


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def needs_line(estimates: list[StageEstimate], gpus: int) -> str:
    """One comment line for a recipe: per training stage, its per-GPU need and the smallest GPU."""
    parts = []
    for e in estimates:
        if e.shape is None:
            continue
        best = min(e.gpus, key=lambda g: g.total)
        ddp = next(g for g in e.gpus if g.strategy == "DDP")
        smallest = next((f"{g} GB" for g in GPU_GB if ddp.fits(g)), None)
        where = f"fits {smallest}" if smallest else "fits no single GPU"
        sharded = "" if best.strategy == "DDP" or gpus == 1 else \
            f", {best.strategy}×{gpus} {best.total / GIB:.0f} GiB"
        parts.append(f"{e.name} {ddp.total / GIB:.0f} GiB/GPU under DDP ({where}){sharded}")
    return "; ".join(parts)


__all__ = ["STRATEGIES", "estimate_path", "estimate_table", "needs_line", "render"]
