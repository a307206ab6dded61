"""Per-GPU memory under DDP, FSDP (full shard) and DeepSpeed ZeRO-2 / ZeRO-3.

What each keeps per GPU, for N GPUs (Rajbhandari et al., "ZeRO", 2020):

| strategy | weights | gradients | AdamW moments | plus |
|---|---|---|---|---|
| DDP | all | all | all | |
| ZeRO-2 | all | 1/N | 1/N | |
| ZeRO-3 | 1/N | 1/N | 1/N | the largest module gathered, twice (prefetch) |
| FSDP full shard | 1/N | 1/N | 1/N | the largest decoder layer, twice, and the root unit |

FSDP wraps decoder layers (configs/accelerate/fsdp.yaml); what no wrapped layer holds
(embeddings, vision tower, final norm) is the root unit, gathered for the whole step.

Gradients and moments exist for trainable parameters only; activations are per
micro-batch on every GPU alike. A GPU fits when the sum, plus the CUDA context and
the allocator's slack, is within its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("DDP", "FSDP", "ZeRO-2", "ZeRO-3")
GPU_GB = (24, 40, 80, 141)  # RTX 4090 / L4-class, A100-40GB, A100/H100-80GB, H200
CONTEXT_BYTES = 1 * 2**30  # CUDA context, cuBLAS workspaces
SLACK = 1.10  # caching allocator fragmentation


@dataclass(frozen=True)
class StateBytes:
    """Whole-model bytes before sharding."""

    weights: int  # as engines that keep every weight whole hold them (DDP, ZeRO-2)
    partitioned: int  # as engines that partition weights hold them, before sharding (FSDP, ZeRO-3)
    gradients: int
    optimizer: int
    largest_layer: int  # weights of the largest decoder layer (FSDP's unit)
    largest_module: int  # weights of the largest module with its own parameters (ZeRO-3's unit)
    root: int  # weights in no decoder layer (FSDP's root unit)


@dataclass(frozen=True)
class PerGPU:
    strategy: str
    gpus: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered

    def fits(self, gpu_gb: float) -> bool:
        return self.total * SLACK + CONTEXT_BYTES <= gpu_gb * 2**30


def state_bytes(total: int, trainable: int, weight_bytes: int, largest_layer: int = 0,
                largest_module: int = 0, root: int = 0, held: int = 0, held_bytes: int = 0) -> StateBytes:
    """Weights at `weight_bytes` (4: fp32 master weights under bf16 mixed precision), gradients
    alike, AdamW's two moments in the weights' dtype; the rest are parameter counts. `held` of the
    weights (a stage's frozen ones, `mose.train.precision`) are held in `held_bytes` by engines that
    keep weights whole; engines that partition them keep every weight at `weight_bytes`."""
    whole = total * weight_bytes
    return StateBytes(weights=whole - held * (weight_bytes - held_bytes) if held else whole,
                      partitioned=whole, gradients=trainable * weight_bytes,
                      optimizer=2 * trainable * weight_bytes, largest_layer=largest_layer * weight_bytes,
                      largest_module=largest_module * weight_bytes, root=root * weight_bytes)


def per_gpu(state: StateBytes, activations: int, strategy: str, gpus: int) -> PerGPU:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    shard_weights = strategy in ("FSDP", "ZeRO-3")
    shard_rest = strategy != "DDP"
    gathered = 0
    if gpus > 1 and strategy == "FSDP":
        gathered = 2 * state.largest_layer + state.root
    elif gpus > 1 and strategy == "ZeRO-3":
        gathered = 2 * state.largest_module
    return PerGPU(strategy=strategy, gpus=gpus,
                  weights=_share(state.partitioned, gpus) if shard_weights else state.weights,
                  gradients=_share(state.gradients, gpus if shard_rest else 1),
                  optimizer=_share(state.optimizer, gpus if shard_rest else 1),
                  activations=activations, gathered=gathered)


def _share(value: int, parts: int) -> int:
    return -(-value // parts)  # ceiling: the last shard is padded to the others' size
