"""Gated-MLP experts with stacked weights, computed per sample group or per token group.

Weights are stacked like transformers' fused MoE experts: `gate_up_proj` is
(E, 2I, H) and `down_proj` is (E, H, I), both in nn.Linear's (out, in) layout,
so expert e computes down[e] @ (act(gate[e] @ x) * (up[e] @ x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act_fn: nn.Module, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device))
        self.act_fn = act_fn

    @classmethod
    def upcycle(cls, mlp: nn.Module, num_experts: int, scale: float = 1.0) -> Experts:
        """E copies of a gated MLP (gate_proj, up_proj, down_proj), output scaled by `scale`."""
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        experts = cls(num_experts, gate.shape[1], gate.shape[0], mlp.act_fn,
                      dtype=gate.dtype, device=gate.device)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.cat([gate, up], dim=0).expand(num_experts, -1, -1))
            experts.down_proj.copy_((down * scale).expand(num_experts, -1, -1))
        return experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x of shape (..., H) → (..., H)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (..., I) each
        return F.linear(self.act_fn(gate) * up, self.down_proj[e])

    def by_sample(self, x: torch.Tensor, experts: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """Every token of a sample goes to the sample's experts.

        x: (B, T, H); experts, weights: (B, k). Samples are grouped by expert so
        each expert runs once on whole sequences: no per-token gather.
        """
        out = None
        for j in range(experts.shape[1]):
            column, w = experts[:, j], weights[:, j]
            for e in column.unique().tolist():
                if column.numel() == 1 or bool((column == e).all()):
                    y = self.expert(e, x) * w[:, None, None].to(x.dtype)  # (B, T, H)
                    out = y if out is None else out + y
                    continue
                rows = (column == e).nonzero().squeeze(1)  # (n,)
                y = self.expert(e, x[rows]) * w[rows, None, None].to(x.dtype)  # (n, T, H)
                out = torch.zeros_like(x) if out is None else out
                out = out.index_add(0, rows, y)
        return out

    def by_token(self, x: torch.Tensor, experts: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """Each token goes to its own experts.

        x: (N, H); experts, weights: (N, k). Token slots are sorted by expert so
        each expert runs once on a contiguous slice.
        """
        k = experts.shape[1]
        slots = experts.reshape(-1)  # (N*k,)
        order = slots.argsort(stable=True)  # (N*k,)
        counts = torch.bincount(slots, minlength=self.num_experts).tolist()
        source = order // k  # (N*k,) token of each sorted slot
        xs = x[source]  # (N*k, H)
        chunks, start = [], 0
        for e, count in enumerate(counts):
            if count:
                chunks.append(self.expert(e, xs[start:start + count]))
                start += count
        ys = torch.cat(chunks) * weights.reshape(-1)[order, None].to(x.dtype)  # (N*k, H)
        return torch.zeros_like(x).index_add(0, source, ys)
