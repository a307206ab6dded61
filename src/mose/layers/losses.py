"""Losses the routers train with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def skill_routing_loss(router_logits: dict[int, torch.Tensor], level_of_layer: dict[int, int],
                       skill_labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean over MoSE layers of the cross-entropy between router scores and skill labels:
    one value per sample, shape (B,), with `per_sample`, else their mean.

    router_logits: layer → (B, S_level); skill_labels: (B, L).
    """
    if not router_logits:
        raise RuntimeError("no router logits recorded in this forward pass")
    losses = torch.stack([
        F.cross_entropy(logits.float(), skill_labels[:, level_of_layer[layer]], reduction="none")
        for layer, logits in router_logits.items()
    ]).mean(0)  # (B,)
    return losses if per_sample else losses.mean()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer balance loss: E * sum_e f_e * P_e over real tokens.

    probs: (N, E) router probabilities; experts: (N, k) chosen; mask: (N,) real tokens.
    f_e is the fraction of token slots sent to e, P_e the mean probability of e.
    Equals 1 when routing is uniform.
    """
    num_experts = probs.shape[-1]
    weight = probs.new_ones(probs.shape[0]) if mask is None else mask.float()  # (N,)
    total = weight.sum().clamp(min=1.0)
    one_hot = F.one_hot(experts, num_experts).float().sum(dim=1)  # (N, E)
    fraction = (one_hot * weight[:, None]).sum(0) / (total * experts.shape[1])  # (E,)
    mean_prob = (probs * weight[:, None]).sum(0) / total  # (E,)
    return num_experts * (fraction * mean_prob).sum()
