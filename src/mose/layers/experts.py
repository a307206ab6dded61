"""Gated-MLP experts with stacked weights, computed per sample group or per token group.

Weights are stacked like transformers' fused MoE experts: `gate_up_proj` is
(E, 2I, H) and `down_proj` is (E, H, I), both in nn.Linear's (out, in) layout,
so expert e computes down[e] @ (act(gate[e] @ x) * (up[e] @ x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mose.routing import SampleGroups, sample_groups


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
        return self._run(self.gate_up_proj[e], self.down_proj[e], x)

    def _run(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (..., I) each
        return F.linear(self.act_fn(gate) * up, down)

    def _per_expert(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        # One unbind per call: its backward stacks the used experts' gradients once,
        # where indexing per expert would build a full-size zero gradient per expert.
        return self.gate_up_proj.unbind(0), self.down_proj.unbind(0)

    def by_sample(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                  groups: SampleGroups | None = None) -> torch.Tensor:
        """Every token of a sample goes to the sample's experts.

        x: (B, T, H); experts, weights: (B, k). Samples are grouped by expert so
        each expert runs once on whole sequences: no per-token gather. `groups`
        (from `sample_groups`) may be passed in to reuse one grouping across
        decode steps.
        """
        gate_up, down = self._per_expert()
        groups = sample_groups(experts) if groups is None else groups
        # Top-1 weights are exactly 1 in value; they matter only for the router's gradient.
        top1 = len(groups) == 1
        scale = weights.requires_grad or not top1
        out = None
        for j, column in enumerate(groups):
            for e, index in column:
                rows = x if index is None else x.index_select(0, index)  # (n, T, H)
                y = self._run(gate_up[e], down[e], rows)
                if scale:
                    w = weights[:, j] if index is None else weights.index_select(0, index)[:, j]
                    y = y * w[:, None, None].to(y.dtype)
                if index is None:  # the whole batch: no scatter
                    out = y if out is None else out + y
                    continue
                if out is None:
                    # In the experts' output dtype, which autocast makes bf16 while x stays fp32:
                    # CUDA's index_copy / index_add need equal dtypes (CPU autocast would promote).
                    # Top-1 covers every sample exactly once: copy, no zero fill and add.
                    out = (x.new_empty if top1 else x.new_zeros)(x.shape, dtype=y.dtype)
                out = out.index_copy(0, index, y) if top1 else out.index_add(0, index, y)
        return out

    def by_token(self, x: torch.Tensor, experts: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """Each token goes to its own experts.

        x: (N, H); experts, weights: (N, k). Token slots are sorted by expert so
        each expert runs once on a contiguous slice.
        """
        gate_up, down = self._per_expert()
        k = experts.shape[1]
        slots = experts.reshape(-1)  # (N*k,)
        order = slots.argsort(stable=True)  # (N*k,)
        counts = torch.bincount(slots, minlength=self.num_experts).tolist()
        source = order // k  # (N*k,) token of each sorted slot
        xs = x.index_select(0, source)  # (N*k, H)
        chunks, start = [], 0
        for e, count in enumerate(counts):
            if count:
                chunks.append(self._run(gate_up[e], down[e], xs[start:start + count]))
                start += count
        ys = torch.cat(chunks)  # (N*k, H), in the experts' output dtype (bf16 under autocast)
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        return x.new_zeros(x.shape, dtype=ys.dtype).index_add(0, source, ys)  # CUDA: equal dtypes

