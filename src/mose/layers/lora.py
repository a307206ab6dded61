"""LoRA skill experts: stacked low-rank deltas of one frozen gated FFN.

Expert e changes the FFN's projection t (gate, up or down) by
ΔW_t[e] = scale · B_t[e] @ A_t[e], with A_t (E, r, in) and B_t (E, out, r) in
nn.Linear's (out, in) layout and scale = alpha / r:

    A_gate (E, r, H)   B_gate (E, I, r)
    A_up   (E, r, H)   B_up   (E, I, r)
    A_down (E, r, I)   B_down (E, H, r)

(only the targets the config names exist). B starts at zero, so every delta is
exactly zero at conversion. The FFN these deltas modify is not here: a block
computes `lora_ffn(base, x, delta)` = down'(act(gate'(x)) * up'(x)) where each
primed projection is the base projection plus `delta(target, z)`, the sum of the
always-on shared delta and the routed ones. Routed deltas mix their top-k
experts' deltas with the route weights, Σ_k w_k ΔW[e_k] (for top-1 the weight is
1 in value), so a sample's FFN is one dense FFN with weights W + ΔW_shared + ΔW_route.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mose.config import LORA_TARGETS
from mose.layers.experts import StackedExperts, grouped_linear
from mose.routing import dispatch, weight_on

# (target, input of that projection (..., in)) → the delta's output (..., out), or None
# where the target has no delta.
DeltaFn = Callable[[str, torch.Tensor], torch.Tensor | None]


class LoRAExperts(StackedExperts):
    """E LoRA deltas of a gated FFN's projections, stacked per target.

    Keeps `num_experts` like `Experts`, so blocks and analysis read the expert count the
    same way; the weights are `A_<target>` / `B_<target>` instead of `gate_up_proj` /
    `down_proj`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        unknown = set(targets) - set(LORA_TARGETS)
        if unknown or not targets:
            raise ValueError(f"LoRA targets must be among {LORA_TARGETS}, got {targets}")
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.targets = tuple(t for t in LORA_TARGETS if t in targets)
        dims = {"gate": (hidden_size, intermediate_size), "up": (hidden_size, intermediate_size),
                "down": (intermediate_size, hidden_size)}  # target → (in, out)
        self.dims = {t: dims[t] for t in self.targets}
        for t, (d_in, d_out) in self.dims.items():
            a = nn.Parameter(torch.empty(num_experts, rank, d_in, dtype=dtype, device=device))
            # PEFT's A init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)),
            # drawn independently per expert.
            bound = 1.0 / math.sqrt(d_in)
            nn.init.uniform_(a, -bound, bound)
            self.register_parameter(f"A_{t}", a)
            self.register_parameter(
                f"B_{t}", nn.Parameter(torch.zeros(num_experts, d_out, rank, dtype=dtype, device=device)))

    @classmethod
    def for_ffn(cls, mlp: nn.Module, num_experts: int, *, rank: int, alpha: float,
                targets: tuple[str, ...]) -> LoRAExperts:
        """E zero deltas of a gated MLP (gate_proj, up_proj, down_proj), in its dtype and device."""
        gate = mlp.gate_proj.weight  # (I, H)
        return cls(num_experts, gate.shape[1], gate.shape[0], rank=rank, alpha=alpha,
                   targets=targets, dtype=gate.dtype, device=gate.device)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, "
                f"targets={self.targets}")

    def A(self, target: str) -> torch.Tensor:  # noqa: N802 (the LoRA paper's names)
        return getattr(self, f"A_{target}")

    def B(self, target: str) -> torch.Tensor:  # noqa: N802
        return getattr(self, f"B_{target}")

    def delta_weight(self, target: str, e: int) -> torch.Tensor:
        """Expert e's dense delta of `target`, scale · B @ A, (out, in): for merging and tests."""
        return self.scale * self.B(target)[e] @ self.A(target)[e]

    def _called(self, delta: DeltaFn) -> DeltaFn:
        """`delta`, run inside this module's call whenever it is applied (`StackedExperts`)."""
        return lambda target, z: self(delta, target, z)

    def always(self, e: int = 0) -> DeltaFn:
        """Expert e's delta for every row (the shared expert's): (..., in) → (..., out)."""
        return self._called(self._always(e))

    def _always(self, e: int) -> DeltaFn:
        def delta(target: str, z: torch.Tensor) -> torch.Tensor | None:
            if target not in self.dims:
                return None
            low = F.linear(z, self.A(target)[e]) * self.scale  # (..., r)
            return F.linear(low, self.B(target)[e])  # (..., out)

        return delta

    def by_common(self, common: tuple[int, ...], experts: torch.Tensor,
                  weights: torch.Tensor) -> DeltaFn:
        """Every sample takes the same experts, `common` (host ints): each delta runs on the
        whole batch as one plain LoRA, with no per-sample gather of A and B. experts, weights:
        (B, k), every row a permutation of `common`; the delta maps (B, T, in) → (B, T, out)."""
        if len(common) == 1 and not weights.requires_grad:  # top-1's weight is 1 in value
            return self.always(common[0])
        mixes = [(self._always(e), weight_on(experts, weights, e)) for e in common]  # (B,) weights

        def delta(target: str, z: torch.Tensor) -> torch.Tensor | None:
            if target not in self.dims:
                return None
            total = None
            for always, w in mixes:
                y = always(target, z)
                y = y * w[:, None, None].to(y.dtype)
                total = y if total is None else total + y
            return total

        return self._called(delta)

    def by_sample(self, experts: torch.Tensor, weights: torch.Tensor) -> DeltaFn:
        """Each sample's own top-k deltas for all its tokens, in batched matmuls (no loop
        over samples). experts, weights: (B, k); the returned delta maps (B, T, in) → (B, T, out).

        Sample b's k experts' A matrices are gathered and stacked along the rank,
        A_b = [A[e_b1]; …; A[e_bk]] (k·r, in), and its B matrices side by side,
        B_b = [B[e_b1], …, B[e_bk]] (out, k·r); then Σ_j w_bj B[e_bj] A[e_bj] z =
        B_b (w_b ⊙ (A_b z)), one torch.bmm each over the batch.
        """
        batch, k = experts.shape

        def delta(target: str, z: torch.Tensor) -> torch.Tensor | None:
            if target not in self.dims:
                return None
            d_in, d_out = self.dims[target]
            seq = z.shape[1]
            a = self.A(target)[experts]  # (B, k, r, in): each sample's experts' A
            a = a.reshape(batch, k * self.rank, d_in)  # (B, k·r, in)
            low = torch.bmm(z, a.transpose(1, 2))  # (B, T, k·r)
            mix = (weights * self.scale).to(low.dtype)  # (B, k)
            low = low.view(batch, seq, k, self.rank) * mix[:, None, :, None]  # (B, T, k, r)
            b = self.B(target)[experts]  # (B, k, out, r)
            b = b.permute(0, 2, 1, 3).reshape(batch, d_out, k * self.rank)  # (B, out, k·r)
            return torch.bmm(low.reshape(batch, seq, k * self.rank), b.transpose(1, 2))  # (B, T, out)

        return self._called(delta)

    def by_token(self, experts: torch.Tensor, weights: torch.Tensor) -> DeltaFn:
        """Each token's own top-k deltas. experts, weights: (N, k); the returned delta maps
        (N, in) → (N, out). Token slots are sorted by expert once, on the device, and each
        target's A and B run as grouped matmuls over the sorted slots (as `Experts.by_token`):
        no host sync, static shapes.
        """
        num_tokens, k = experts.shape
        plan = dispatch(experts, self.num_experts)
        mix = weights.reshape(-1).index_select(0, plan.order) * self.scale  # (N·k,) in sorted order

        def delta(target: str, z: torch.Tensor) -> torch.Tensor | None:
            if target not in self.dims:
                return None
            zs = z.index_select(0, plan.source)  # (N·k, in), by expert
            low = grouped_linear(zs, self.A(target), plan.ends)  # (N·k, r)
            low = low * mix[:, None].to(low.dtype)
            ys = grouped_linear(low, self.B(target), plan.ends)  # (N·k, out)
            out = ys.index_select(0, plan.inverse)  # (N·k, out) in slot order
            return out if k == 1 else out.view(num_tokens, k, -1).sum(1)  # (N, out)

        return self._called(delta)


def combine(*deltas: DeltaFn | None) -> DeltaFn:
    """The sum of several deltas (None ones skipped): the shared delta plus the routed one."""
    present = [d for d in deltas if d is not None]

    def delta(target: str, z: torch.Tensor) -> torch.Tensor | None:
        total = None
        for d in present:
            y = d(target, z)
            if y is not None:
                total = y if total is None else total + y
        return total

    return delta


def lora_ffn(base: nn.Module, x: torch.Tensor, delta: DeltaFn) -> torch.Tensor:
    """The gated FFN `base` with each projection plus its delta: x (..., H) → (..., H).

    With zero deltas this is exactly `base(x)`: the same projections, plus zeros.
    """

    def project(target: str, linear: nn.Module, z: torch.Tensor) -> torch.Tensor:
        y = linear(z)
        d = delta(target, z)
        return y if d is None else y + d.to(y.dtype)

    hidden = base.act_fn(project("gate", base.gate_proj, x)) * project("up", base.up_proj, x)  # (..., I)
    return project("down", base.down_proj, hidden)  # (..., H)
