"""The blocks that replace a decoder layer's FFN: MoSE (per-sample skills) and token MoE.

Both compute `shared(x) + sum_k w_k * expert_k(x)`; they differ in who picks
the experts. A MoSE block's route is chosen before the decoder layer runs
(`observe`, from the mean hidden state entering the layer) and applies to
every token of the sample; a token-MoE block routes each token itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mose.layers.experts import Experts
from mose.layers.losses import load_balancing_loss
from mose.layers.router import Router, top_k
from mose.routing import Route, RoutingState


def upcycled_shared(mlp: nn.Module, scale: float) -> nn.Module:
    """A copy of the dense FFN whose output is scaled by `scale`."""
    shared = copy.deepcopy(mlp)
    with torch.no_grad():
        shared.down_proj.weight.mul_(scale)
    return shared


class ExpertBlock(nn.Module):
    """What both blocks hold: a router, stacked experts, an optional shared expert,
    and the routing state of the model they sit in."""

    def __init__(self, *, router: Router, experts: Experts, shared: nn.Module | None,
                 state: RoutingState, layer_idx: int, top_k: int) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared
        self.state = state
        self.layer_idx = layer_idx
        self.top_k = top_k

    def with_shared(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return routed if self.shared_expert is None else routed + self.shared_expert(x)


def expert_blocks(model: nn.Module) -> list[ExpertBlock]:
    """The MoSE or token-MoE blocks of a converted model, in layer order (none in a dense one)."""
    return [m for m in model.modules() if isinstance(m, ExpertBlock)]


class MoSEBlock(ExpertBlock):
    """Shared expert + skill experts of one level, routed once per sample.

    With modality groups each skill owns two experts, image then text
    (expert 2s is skill s's image expert, 2s + 1 its text expert).
    """

    def __init__(self, *, level: int, modality_groups: bool, **parts) -> None:
        super().__init__(**parts)
        self.level = level
        self.modality_groups = modality_groups

    def observe(self, hidden: torch.Tensor) -> None:
        """Choose this layer's route from the hidden states entering it, (B, T, H)."""
        state = self.state
        mask = state.routed_tokens(hidden)  # (B, T)
        total = (hidden.float() * mask[..., None]).sum(dim=1)  # (B, H)
        count = mask.sum(dim=1, keepdim=True)  # (B, 1)
        if state.decoding and self.layer_idx in state.running:
            # The mean over every token cached so far: what "running" routing reads at each
            # step, and "once" routing when a new prompt continues a filled cache.
            past_total, past_count = state.running[self.layer_idx]
            total, count = total + past_total, count + past_count
        state.running[self.layer_idx] = (total.detach(), count)
        if state.reuse_routes and self.layer_idx in state.routes:
            return
        pooled = total / count.clamp(min=1.0)  # (B, H)
        state.router_inputs[self.layer_idx] = pooled
        logits = self.router(pooled)  # (B, S)
        forced = None if state.skill_labels is None else state.skill_labels[:, self.level]
        experts, weights, probs = top_k(logits, self.top_k, forced)
        state.router_logits[self.layer_idx] = logits
        state.routes[self.layer_idx] = Route(experts, weights, probs.detach())

    def observe_layer_input(self, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the decoder layer: route on its input hidden states."""
        self.observe(args[0] if args else kwargs["hidden_states"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.state.routes.get(self.layer_idx)
        if route is None:
            raise RuntimeError(
                f"MoSE layer {self.layer_idx} has no route: call the converted model, "
                "whose decoder layers choose routes before their FFN runs"
            )
        if self.modality_groups:
            routed = self._by_modality(x, route)
        else:
            routed = self.experts.by_sample(x, route.experts, route.weights, route.sample_groups())
            self._record(route.experts[:, None, :].expand(-1, x.shape[1], -1))  # (B, T, k)
        return self.with_shared(routed, x)

    def _by_modality(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        batch, seq, hidden = x.shape
        image = self.state.image_mask
        if image is None or image.shape != (batch, seq):
            image = torch.zeros(batch, seq, dtype=torch.bool, device=x.device)  # text only
        is_text = (~image).long()[..., None]  # (B, T, 1)
        experts = route.experts[:, None, :] * 2 + is_text  # (B, T, k)
        weights = route.weights[:, None, :].expand(-1, seq, -1)  # (B, T, k)
        k = experts.shape[-1]
        self._record(experts)
        routed = self.experts.by_token(
            x.reshape(-1, hidden), experts.reshape(-1, k), weights.reshape(-1, k))  # (B*T, H)
        return routed.view(batch, seq, hidden)

    def _record(self, experts: torch.Tensor) -> None:
        """Keep each token's experts, (B, T, k), for `state.tokens_per_expert`."""
        mask = self.state.real_tokens(experts)  # (B, T)
        self.state.assignments[self.layer_idx] = (experts, mask, self.experts.num_experts)


class TokenMoEBlock(ExpertBlock):
    """Token-level top-k MoE (the baseline), optionally with a shared expert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)  # (N, H)
        logits = self.router(flat)  # (N, E)
        experts, weights, probs = top_k(logits, self.top_k)  # (N, k), (N, k), (N, E)
        mask = self.state.real_tokens(x).reshape(-1)  # (N,)
        self.state.router_logits[self.layer_idx] = logits
        self.state.aux_losses[self.layer_idx] = load_balancing_loss(probs, experts, mask)
        self.state.assignments[self.layer_idx] = (experts, mask, self.experts.num_experts)
        routed = self.experts.by_token(flat, experts, weights).view(batch, seq, hidden)  # (B, T, H)
        return self.with_shared(routed, x)
