"""Gated-MLP experts with stacked weights, computed per sample group or per token group.

Weights are stacked like transformers' fused MoE experts: `gate_up_proj` is
(E, 2I, H) and `down_proj` is (E, H, I), both in nn.Linear's (out, in) layout,
so expert e computes down[e] @ (act(gate[e] @ x) * (up[e] @ x)).

Dispatch is static: rows are sorted by expert on the device (`mose.routing.dispatch`)
and each projection is one grouped matmul over the sorted rows (`grouped_linear`),
so no forward reads the routes on the host and one compiled graph serves every route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mose.routing import Dispatch, dispatch, weight_on

# (device, dtype) pairs where torch._grouped_mm said it does not support them: the loop serves
# those since, and a warning said so once.
_NO_NATIVE: set[tuple[str, torch.dtype]] = set()
# CUDA's grouped GEMM is bf16-only (and needs sm90+: an unsupported GPU falls back to the loop).
_NATIVE_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}
log = logging.getLogger(__name__)


def _strided_ok(t: torch.Tensor) -> bool:
    """torch._grouped_mm's layout rule: row- or column-major last two dims, 16-byte strides."""
    size, stride = t.shape[-2:], t.stride()[-2:]
    major = (stride[1] == 1 and stride[0] >= max(size[1], 1)) or (
        stride[0] == 1 and stride[1] >= max(size[0], 1))
    strides = t.stride()
    return (major and t.data_ptr() % 16 == 0
            and all((s * t.element_size()) % 16 == 0 for s in strides if s != 1))


def _native(*tensors: torch.Tensor) -> bool:
    t = tensors[0]
    return (t.dtype in _NATIVE_DTYPES.get(t.device.type, ()) and (str(t.device), t.dtype) not in _NO_NATIVE
            and all(u.dtype == t.dtype for u in tensors) and all(_strided_ok(u) for u in tensors))


def _unsupported(error: Exception) -> bool:
    """Whether torch._grouped_mm refused the device or dtype (a check of its own, before any
    kernel ran), as opposed to failing on it: an illegal access, a device-side assert or a
    driver error leaves the device unusable, and the loop must not hide it."""
    message = str(error)
    return isinstance(error, NotImplementedError) or (
        "support" in message and "CUDA error" not in message and "CUBLAS_STATUS" not in message)


def _try_native(tensors: tuple[torch.Tensor, ...], ends: torch.Tensor) -> torch.Tensor | None:
    if not _native(*tensors):
        return None
    try:
        return torch._grouped_mm(*tensors, offs=ends)
    except (RuntimeError, NotImplementedError) as error:
        if isinstance(error, torch.OutOfMemoryError) or not _unsupported(error):
            raise
        key = (str(tensors[0].device), tensors[0].dtype)
        _NO_NATIVE.add(key)
        log.warning("torch._grouped_mm does not support %s %s here (%s); experts on it run as a loop "
                    "over their groups from now on, which is slower", *key, error)
        return None


def _bounds(ends: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, end) of the non-empty groups: the loop's one device→host copy."""
    stops = ends.tolist()
    starts = [0, *stops[:-1]]
    return [(g, a, b) for g, (a, b) in enumerate(zip(starts, stops, strict=True)) if b > a]


def _grouped_mm_impl(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (N, K) rows sorted by group, w (G, K, M), ends (G,) int32 → (N, M): x[rows of g] @ w[g]."""
    x = x.contiguous()
    out = _try_native((x, w), ends)
    if out is not None:
        return out
    chunks = [x[a:b] @ w[g] for g, a, b in _bounds(ends)]
    return torch.cat(chunks) if chunks else x.new_zeros(x.shape[0], w.shape[2])


@torch.library.custom_op("mose::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_impl(x, w, ends)


@_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("mose::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """grad (N, M), x (N, K) sorted by group → (G, M, K): grad[rows of g]ᵀ @ x[rows of g].

    (G, M, K) is nn.Linear's layout of the stacked weights, whose (G, K, M) transpose the
    forward multiplied by: the gradient lands in the parameter's own layout, with no copy.
    """
    out = _try_native((grad.t(), x), ends)
    if out is not None:
        return out
    out = x.new_zeros(ends.shape[0], grad.shape[1], x.shape[1])
    for g, a, b in _bounds(ends):
        torch.mm(grad[a:b].t(), x[a:b], out=out[g])
    return out


@_grouped_mm_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(ends.shape[0], grad.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, w, ends = inputs
    ctx.save_for_backward(x, w, ends)


def _backward(ctx, grad: torch.Tensor):
    x, w, ends = ctx.saved_tensors
    grad = grad.contiguous()  # a sum's gradient comes expanded (stride 0)
    grad_x = _grouped_mm(grad, w.transpose(1, 2), ends) if ctx.needs_input_grad[0] else None
    grad_w = (_grouped_mm_weight_grad(grad, x.contiguous(), ends).transpose(1, 2)
              if ctx.needs_input_grad[1] else None)
    return grad_x, grad_w, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """F.linear per group of rows: x (N, in) sorted by group, weight (G, out, in) in
    nn.Linear's layout, ends (G,) int32 cumulative group ends → (N, out).

    One `torch._grouped_mm` where this torch build has it for the device and dtype
    (and the strides are 16-byte aligned), else a loop over the non-empty groups, which
    reads the group sizes on the host. Either way it is one opaque op to torch.compile,
    with static output shapes: no graph break, no recompilation when the groups change.
    Under autocast both operands are cast to the autocast dtype, as F.linear would.
    An eager call with nothing to differentiate skips the op's dispatch (tens of µs,
    which a decode step's tiny matmuls notice) and runs its kernel directly.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    w = weight.transpose(1, 2)  # (G, in, out)
    if (torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.ops.mose.grouped_mm(x, w, ends)
    return _grouped_mm_impl(x, w, ends)


class StackedExperts(nn.Module):
    """Stacked expert weights whose every computation runs inside the module's own call.

    Engines that hold weights partitioned until the module owning them runs (DeepSpeed
    ZeRO-3 gathers a module's weights in its forward pre-hook, and prefetches the next
    module's) see these weights only when read there; read from a block's forward, they
    would be gathered late, one at a time, or not at all. So each public computation is
    `self(compute, *args)`, and `forward` runs it.
    """

    def forward(self, compute: Callable[..., Any], *args: Any) -> Any:
        return compute(*args)


class Experts(StackedExperts):
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
        return self(self._expert, e, x)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.gate_up_proj[e], self.down_proj[e], x)

    def _run(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (..., I) each
        return F.linear(self.act_fn(gate) * up, down)

    def grouped(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Each expert on its group of rows: xs (N, H) sorted by expert, ends (E,) → (N, H)."""
        gate, up = grouped_linear(xs, self.gate_up_proj, ends).chunk(2, dim=-1)  # (N, I) each
        return grouped_linear(self.act_fn(gate) * up, self.down_proj, ends)

    def by_sample(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                  plan: Dispatch | None = None) -> torch.Tensor:
        """Every token of a sample goes to the sample's experts.

        x: (B, T, H); experts, weights: (B, k). Samples are sorted by expert on the
        device and each expert runs once on its samples' whole sequences (one grouped
        matmul per projection): no per-token gather, no host sync. `plan` (from
        `mose.routing.dispatch`) may be passed in to reuse one grouping across decode steps.
        """
        return self(self._by_sample, x, experts, weights, plan)

    def _by_sample(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                   plan: Dispatch | None) -> torch.Tensor:
        batch, seq, hidden = x.shape
        k = experts.shape[1]
        plan = dispatch(experts, self.num_experts) if plan is None else plan
        xs = x.index_select(0, plan.source).reshape(-1, hidden)  # (B·k·T, H), by expert
        ys = self.grouped(xs, plan.ends * seq).view(batch * k, seq, hidden)  # (B·k, T, H)
        # Top-1 weights are exactly 1 in value; they matter only for the router's gradient.
        if weights.requires_grad or k > 1:
            w = weights.reshape(-1).index_select(0, plan.order)  # (B·k,) in sorted order
            ys = ys * w[:, None, None].to(ys.dtype)
        # Back to slot order: a gather, in the experts' output dtype (bf16 under autocast).
        out = ys.index_select(0, plan.inverse)  # (B·k, T, H)
        return out.view(batch, seq, hidden) if k == 1 else out.view(batch, k, seq, hidden).sum(1)

    def by_common(self, x: torch.Tensor, common: tuple[int, ...], experts: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """Every sample goes to the same experts, `common` (host ints): each runs on the whole
        batch as a plain FFN, with no sort, gather or grouped matmul. A decode step reads each
        expert's weights once either way; what this saves is the dispatch's dozen small ops.

        x: (B, T, H); experts, weights: (B, k), every row a permutation of `common`.
        """
        return self(self._by_common, x, common, experts, weights)

    def _by_common(self, x: torch.Tensor, common: tuple[int, ...], experts: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
        if len(common) == 1 and not weights.requires_grad:  # top-1's weight is 1 in value
            return self._expert(common[0], x)
        out = None  # summed in the experts' output dtype (bf16 under autocast), as by_sample does
        for e in common:
            w = weight_on(experts, weights, e)  # (B,)
            y = self._expert(e, x)
            y = y * w[:, None, None].to(y.dtype)
            out = y if out is None else out + y
        return out

    def by_token(self, x: torch.Tensor, experts: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """Each token goes to its own experts.

        x: (N, H); experts, weights: (N, k). Token slots are sorted by expert on the
        device and each expert runs once on its contiguous group (grouped matmuls).
        """
        return self(self._by_token, x, experts, weights)

    def _by_token(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_tokens, k = experts.shape
        plan = dispatch(experts, self.num_experts)
        ys = self.grouped(x.index_select(0, plan.source), plan.ends)  # (N·k, H), by expert
        if weights.requires_grad or k > 1:
            ys = ys * weights.reshape(-1).index_select(0, plan.order)[:, None].to(ys.dtype)
        out = ys.index_select(0, plan.inverse)  # (N·k, H) in slot order
        return out if k == 1 else out.view(num_tokens, k, -1).sum(1)
