"""Routes as batch keys: each prompt's full route, and batches that share one.

A MoSE layer reads one skill expert per distinct skill in a batch, so a decode
step over a batch that spreads over three skills reads 1 + 3 FFNs where the
FLOP ideal assumes 1 + k (`bench/README.md`). Routes depend on the prompt only
(never on padding or batch mates). `mose predict` reads them from its prefill
and decodes route groups (`mose.eval.regroup`); `route_keys` decides them
without decoding, by a forward cut short once the last MoSE layer's router has
run (the routing pass), for callers that need routes before any generation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from mose.config import MoSEConfig

# Per MoSE layer, in layer order: the experts chosen there (k of them, sorted: what a
# decode step reads is the set, not the rank order).
RouteKey = tuple[tuple[int, ...], ...]


def is_mose(model: Any) -> bool:
    """A converted MoSE model (dense and token-MoE models route nothing per sample)."""
    return isinstance(getattr(model, "mose_config", None), MoSEConfig)


def route_keys(model: Any, inputs: Mapping[str, torch.Tensor]) -> list[RouteKey]:
    """Each prompt's full route, from a forward over the batch that stops after the last router."""
    if not is_mose(model):
        raise TypeError(f"{type(model).__name__} is not a MoSE model: it has no per-sample routes")
    with torch.no_grad(), model.routing_only():
        model(**inputs, use_cache=False)
    return current_route_keys(model)


def current_route_keys(model: Any) -> list[RouteKey]:
    """Each sample's full route in the model's last forward or generate."""
    routes = model.mose_state.routes
    if not routes:
        raise RuntimeError("no routes recorded yet: run a forward pass or generate() first")
    experts = torch.stack([routes[i].experts for i in sorted(routes)], dim=1)  # (B, M, k)
    return [tuple(tuple(sorted(layer)) for layer in sample) for sample in experts.tolist()]


def plain_batches(count: int, batch_size: int) -> list[list[int]]:
    """Indices 0..count-1 in order, cut into batches."""
    check_batch_size(batch_size)
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def route_aware_batches(keys: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """Indices grouped by key, then cut into batches that each share one key.

    Groups come in the order of their first member, members in input order, so
    the plan is deterministic; only a group's last batch may be short.
    """
    check_batch_size(batch_size)
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [rows[start:start + batch_size] for rows in groups.values()
            for start in range(0, len(rows), batch_size)]


def check_batch_size(batch_size: int) -> None:
    """A clear error for a batch size that is not a positive int."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
