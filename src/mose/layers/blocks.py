"""The blocks that replace a decoder layer's FFN: MoSE (per-sample skills) and token MoE.

Both compute `shared(x) + sum_k w_k * expert_k(x)`; they differ in who picks
the experts. A MoSE block's route is chosen before the decoder layer runs
(`observe`, from the mean hidden state entering the layer) and applies to
every token of the sample; a token-MoE block routes each token itself.

With LoRA experts (`LoRAMoSEBlock`, `LoRATokenMoEBlock`) the block keeps the dense
FFN as `base`, frozen, and its experts are low-rank deltas of it: the output is
the FFN with weights W + ΔW_shared + Σ_k w_k ΔW_k (see `mose.layers.lora`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mose.layers.experts import Experts
from mose.layers.lora import DeltaFn, LoRAExperts, combine, lora_ffn
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
    and the routing state of the model they sit in.

    With LoRA experts, `experts` and `shared_expert` are `LoRAExperts` (E deltas and one)
    and `base` is the dense FFN they modify; with full experts `base` is None.
    """

    def __init__(self, *, router: Router, experts: Experts | LoRAExperts, shared: nn.Module | None,
                 state: RoutingState, layer_idx: int, top_k: int, base: nn.Module | None = None) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared
        self.state = state
        self.layer_idx = layer_idx
        self.top_k = top_k
        self.base = base
        if base is not None:
            base.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> ExpertBlock:
        """As nn.Module's, but a LoRA block's base FFN stays frozen: training "the blocks"
        (the SFT stage turns them on wholesale) trains the deltas and the router only.
        To train the base too, call `block.base.requires_grad_(True)` after this."""
        super().requires_grad_(requires_grad)
        if self.base is not None:
            self.base.requires_grad_(False)
        return self

    def with_shared(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return routed if self.shared_expert is None else routed + self.shared_expert(x)


def _shared_delta(block: ExpertBlock) -> DeltaFn | None:
    """A LoRA block's always-on delta, or None without a shared expert."""
    return None if block.shared_expert is None else block.shared_expert.always()


def pooled_sum(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_t hidden[b, t] over the positions `mask` keeps, accumulated in float32.

    hidden: (B, T, H); mask: (B, T) bool, or None for every token → (B, H) float32.
    The other positions are selected out, not multiplied by zero: whatever a padding
    position holds (NaN and Inf included, 0 · NaN being NaN) never reaches a route.
    """
    if mask is not None:
        hidden = hidden.masked_fill(~mask[..., None], 0)  # (B, T, H)
    return hidden.sum(dim=1, dtype=torch.float32)


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
        mask = state.routed_tokens(hidden)  # (B, T) bool, or None for every token
        total = pooled_sum(hidden, mask)  # (B, H) float32
        count = (hidden.new_full((hidden.shape[0], 1), hidden.shape[1], dtype=torch.float32)
                 if mask is None else mask.sum(dim=1, keepdim=True, dtype=torch.float32))  # (B, 1)
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
        route = self.route()
        if self.modality_groups:
            return self.with_shared(self._by_modality(x, route), x)
        self._record(route.experts[:, None, :].expand(-1, x.shape[1], -1))  # (B, T, k)
        if self.use_common(route):
            routed = self.experts.by_common(x, route.common, route.experts, route.weights)
        else:
            plan = route.dispatch(self.experts.num_experts)
            routed = self.experts.by_sample(x, route.experts, route.weights, plan)
        return self.with_shared(routed, x)

    def route(self) -> Route:
        """This layer's route for the current forward, chosen by `observe`."""
        route = self.state.routes.get(self.layer_idx)
        if route is None:
            raise RuntimeError(
                f"MoSE layer {self.layer_idx} has no route: call the converted model, "
                "whose decoder layers choose routes before their FFN runs"
            )
        return route

    @staticmethod
    def use_common(route: Route) -> bool:
        """Whether this forward runs the experts the whole batch shares, as the host knows
        them (`Route.common`), without the dispatch. A compiled graph keeps the dispatch and
        never reads `common`: guarding on its host ints would recompile it for every route."""
        return not torch.compiler.is_compiling() and route.common is not None

    def token_experts(self, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality groups: each token's experts and weights, (B, T, k) each (recorded)."""
        batch, seq, _ = x.shape
        image = self.state.image_mask
        if image is None or image.shape != (batch, seq):
            image = torch.zeros(batch, seq, dtype=torch.bool, device=x.device)  # text only
        is_text = (~image).long()[..., None]  # (B, T, 1)
        experts = route.experts[:, None, :] * 2 + is_text  # (B, T, k)
        weights = route.weights[:, None, :].expand(-1, seq, -1)  # (B, T, k)
        self._record(experts)
        return experts, weights

    def _by_modality(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        batch, seq, hidden = x.shape
        experts, weights = self.token_experts(x, route)  # (B, T, k) each
        k = experts.shape[-1]
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
        experts, weights = self.route_tokens(x, flat)  # (N, k) each
        routed = self.experts.by_token(flat, experts, weights).view(batch, seq, hidden)  # (B, T, H)
        return self.with_shared(routed, x)

    def route_tokens(self, x: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and weights, (N, k) each; logits and balance loss recorded."""
        logits = self.router(flat)  # (N, E)
        experts, weights, probs = top_k(logits, self.top_k)  # (N, k), (N, k), (N, E)
        mask = self.state.real_tokens(x).reshape(-1)  # (N,)
        self.state.router_logits[self.layer_idx] = logits
        self.state.aux_losses[self.layer_idx] = load_balancing_loss(probs, experts, mask)
        self.state.assignments[self.layer_idx] = (experts, mask, self.experts.num_experts)
        return experts, weights


class LoRAMoSEBlock(MoSEBlock):
    """MoSE with LoRA skill experts: per sample, the frozen FFN `base` with weights
    W + ΔW_shared + Σ_k w_k ΔW_skill_k, one route per sample as for full experts.

    Without modality groups each sample's deltas are gathered and applied in batched
    matmuls (`LoRAExperts.by_sample`); with them, the image and text deltas of a skill
    (2s, 2s + 1) are chosen per token (`LoRAExperts.by_token`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route()
        if not self.modality_groups:
            self._record(route.experts[:, None, :].expand(-1, x.shape[1], -1))  # (B, T, k)
            routed = (self.experts.by_common(route.common, route.experts, route.weights)
                      if self.use_common(route) else self.experts.by_sample(route.experts, route.weights))
            return lora_ffn(self.base, x, combine(_shared_delta(self), routed))  # (B, T, H)
        batch, seq, hidden = x.shape
        experts, weights = self.token_experts(x, route)  # (B, T, k) each
        k = experts.shape[-1]
        routed = self.experts.by_token(experts.reshape(-1, k), weights.reshape(-1, k))  # over (B*T, ·)
        out = lora_ffn(self.base, x.reshape(-1, hidden), combine(_shared_delta(self), routed))  # (B*T, H)
        return out.view(batch, seq, hidden)


class LoRATokenMoEBlock(TokenMoEBlock):
    """The token-MoE baseline over LoRA deltas: each token's FFN is the frozen `base`
    with weights W (+ ΔW_shared) + Σ_k w_k ΔW_k over its own top-k deltas."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)  # (N, H)
        experts, weights = self.route_tokens(x, flat)  # (N, k) each
        routed = self.experts.by_token(experts, weights)
        return lora_ffn(self.base, flat, combine(_shared_delta(self), routed)).view(batch, seq, hidden)
