"""Routers: a linear scorer and the top-k choice with renormalised weights.

The chosen experts' weights are renormalised to sum to one in the forward
pass, which keeps an upcycled model equal to the dense one, but the sum is
detached, so the router still gets a gradient from the task loss (with top-1
and an attached sum the weight would be the constant 1).
"""

from __future__ import annotations

import torch
from torch import nn

from mose.probe import Standardiser

ROUTER_INIT_STD = 0.02


class Router(nn.Module):
    """Scores experts (or skills) from a (..., H) input: a linear layer on the standardised input.

    The mean hidden state a MoSE router reads is dominated by a component every
    sample shares (per-feature spread across samples ~1% of its norm on a tiny
    Qwen2-VL), so a linear scorer of the raw input is badly conditioned and
    AdamW barely leaves uniform routing. `input_mean` and `input_scale` are
    fitted on the router stage's labelled inputs (`fit_standardisation`) and
    saved with the model; until then they are the identity (the token-MoE
    baseline keeps it). The router holds float32 weights and computes in float32
    whatever the model's dtype and the autocast state: skill probabilities and the
    skill loss come from unrounded logits.
    """

    def __init__(self, hidden_size: int, num_choices: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_choices, hidden_size, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(num_choices, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=ROUTER_INIT_STD)
        self.register_buffer("input_mean", torch.zeros(hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones(hidden_size, dtype=torch.float32, device=device))

    def _apply(self, fn, recurse: bool = True):
        # model.to(bfloat16), .half(), DeepSpeed's and FSDP's casts: the router moves with the
        # model but keeps float32 weights, which a bf16 round trip would round (skills flip).
        def move_only(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return fn(t)
            target = fn(t.new_empty(0))  # where and in what dtype fn would put t
            if target.dtype == t.dtype:  # a move (or to_empty from the meta device)
                return fn(t)
            return t.to(device=target.device)  # a cast: move only

        return super()._apply(move_only, recurse)

    # While the router stage fits it: the coordinates its weight is trained in, (H, H) applied
    # to the standardised input; folded into the weight when the fit ends (`fold_coordinates`).
    fit_coordinates: torch.Tensor | None = None

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.input_mean.float()) / self.input_scale.float()
        return x if self.fit_coordinates is None else x @ self.fit_coordinates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(self.standardise(x), self.weight.float(), self.bias.float())

    @torch.no_grad()
    def fold_coordinates(self) -> None:
        """The same scores from the standardised input alone: W (C x) = (W C) x, C symmetric."""
        if self.fit_coordinates is not None:
            self.weight.copy_(self.weight @ self.fit_coordinates)
            self.fit_coordinates = None

    @torch.no_grad()
    def fit_standardisation(self, inputs: torch.Tensor) -> None:
        """Set the standardisation from the inputs this router will read, (N, H)."""
        fitted = Standardiser.fit(inputs)
        self.input_mean.copy_(fitted.mean)
        self.input_scale.copy_(fitted.scale)


def top_k(logits: torch.Tensor, k: int,
          forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts from logits (..., E).

    Returns (experts (..., k) long, weights (..., k), probs (..., E) float32).
    With `forced` (...,) the forced expert is the only one, at the constant weight 1:
    the router did not choose it, and a fitted router may give it probability 0
    (p / p would be NaN).
    """
    probs = logits.float().softmax(dim=-1)
    if forced is not None:
        experts = forced.unsqueeze(-1)  # (..., 1)
        return experts, torch.ones(experts.shape, device=probs.device), probs
    experts = probs.topk(k, dim=-1).indices  # (..., k)
    chosen = probs.gather(-1, experts)  # (..., k)
    weights = chosen / chosen.sum(dim=-1, keepdim=True).detach()
    return experts, weights, probs
