"""Routers: a linear scorer and the top-k choice with renormalised weights.

The chosen experts' weights are renormalised to sum to one in the forward
pass, which keeps an upcycled model equal to the dense one, but the sum is
detached, so the router still gets a gradient from the task loss (with top-1
and an attached sum the weight would be the constant 1).
"""

from __future__ import annotations

import torch
from torch import nn

ROUTER_INIT_STD = 0.02


class Router(nn.Module):
    """Scores experts (or skills) from a (..., H) input: a bias-free linear layer."""

    def __init__(self, hidden_size: int, num_choices: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_choices, hidden_size, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=ROUTER_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight)


def top_k(logits: torch.Tensor, k: int,
          forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts from logits (..., E).

    Returns (experts (..., k) long, weights (..., k), probs (..., E) float32).
    With `forced` (...,) the forced expert is the only one, at weight 1.
    """
    probs = logits.float().softmax(dim=-1)
    if forced is not None:
        experts = forced.unsqueeze(-1)  # (..., 1)
    else:
        experts = probs.topk(k, dim=-1).indices  # (..., k)
    chosen = probs.gather(-1, experts)  # (..., k)
    weights = chosen / chosen.sum(dim=-1, keepdim=True).detach()
    return experts, weights, probs
