"""Weights held in a lower precision for a while, then given back exactly as they were.

Under bf16 mixed precision every matmul reads its weights in bf16 anyway, so the weights
a stage does not train need not sit in float32 while it runs: held in bf16 they take half
the memory (a LoRA-MoSE stage's frozen base is almost the whole model), while the trained
weights keep their float32 masters. The router stage pools its inputs once more with every
weight in bf16, as a bf16 model serves them. Routers stay float32 throughout (`Router`).

On exit each weight is as it was, bit for bit: a weight the lower precision holds exactly
(a checkpoint published in bf16, as Qwen2-VL's is, loaded in float32) is cast back; any
other keeps an exact copy in host memory meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mose.layers import Router


def weights(model: nn.Module, frozen_only: bool = False) -> list[nn.Parameter]:
    """The model's floating-point weights but the routers' (each shared weight once);
    with `frozen_only`, those that do not train."""
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    found = {id(p): p for p in model.parameters()
             if p.is_floating_point() and id(p) not in routers and not (frozen_only and p.requires_grad)}
    return list(found.values())


@contextmanager
def held_in(params: Iterable[nn.Parameter], dtype: torch.dtype) -> Iterator[None]:
    """Inside, `params` hold their values in `dtype`; on exit, their own values and dtype."""
    given_back: list[tuple[nn.Parameter, torch.Tensor | torch.dtype]] = []
    try:
        for p in params:
            if p.dtype == dtype:
                continue
            low = p.detach().to(dtype)
            exact = torch.equal(low.to(p.dtype), p.detach())
            given_back.append((p, p.dtype if exact else p.detach().to("cpu", copy=True)))
            p.data = low
        yield
    finally:
        for p, original in given_back:
            p.data = (p.data.to(original) if isinstance(original, torch.dtype)
                      else original.to(p.device))
