"""inject(model, arch, cfg): the chosen layers' FFNs replaced by MoSE or token-MoE blocks.

Every expert starts as a copy of the FFN it replaces (upcycling). With a shared
expert, shared and routed outputs are each scaled by 1/2, and routed weights
sum to one, so the injected model computes exactly what the dense one did.
`mose.convert` injects and then changes the model's class; the converted
classes (`mose.modeling`) inject again in `__init__` when a saved model loads.

With `experts="lora"` nothing is copied: the FFN itself becomes the block's frozen
`base`, and every expert is a LoRA delta whose B starts at zero, so again the
injected model computes exactly what the dense one did.
"""

from __future__ import annotations

from torch import nn

from mose.arch import Arch
from mose.config import MoSEConfig, TokenMoEConfig, resolve_layers
from mose.layers.blocks import (
    ExpertBlock,
    LoRAMoSEBlock,
    LoRATokenMoEBlock,
    MoSEBlock,
    TokenMoEBlock,
    upcycled_shared,
)
from mose.layers.experts import Experts
from mose.layers.lora import LoRAExperts
from mose.layers.router import Router
from mose.routing import RoutingState

AnyConfig = MoSEConfig | TokenMoEConfig


def inject(model: nn.Module, arch: Arch, cfg: AnyConfig) -> None:
    """Replace the chosen layers' FFNs with blocks sharing one RoutingState."""
    layers = arch.layers(model)
    indices = resolve_layers(cfg.layers, len(layers))
    already = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, ExpertBlock)]
    if already:
        raise ValueError(f"model is already converted (MoE blocks at layers {already})")
    for i in indices:
        _check_ffn(layers[i].mlp, i)
    state = RoutingState()
    if isinstance(cfg, MoSEConfig):
        level_of_layer = cfg.level_of_layers(indices)
        for i in indices:
            block = mose_block(layers[i].mlp, cfg, state, i, level_of_layer[i])
            layers[i].mlp = block
            # A bound method, not a closure, so copy.deepcopy rebinds it to the copy's block.
            layers[i].register_forward_pre_hook(block.observe_layer_input, with_kwargs=True)
    else:
        for i in indices:
            layers[i].mlp = token_moe_block(layers[i].mlp, cfg, state, i)
    model.mose_state = state


def _check_ffn(mlp: nn.Module, index: int) -> None:
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(mlp, "act_fn"):
        raise ValueError(
            f"layer {index}: the FFN {type(mlp).__name__} is not a gated MLP "
            "(gate_proj, up_proj, down_proj, act_fn)"
        )
    if any(p.bias is not None for p in parts):
        raise ValueError(f"layer {index}: FFNs with biases are not supported")


def _shared_and_scale(mlp: nn.Module, shared_expert: bool) -> tuple[nn.Module | None, float]:
    # Shared and routed outputs each get half the FFN so their sum is the FFN.
    return (upcycled_shared(mlp, 0.5), 0.5) if shared_expert else (None, 1.0)


def _lora_parts(mlp: nn.Module, cfg: AnyConfig, num_experts: int) -> dict:
    """The LoRA blocks' parts: routed deltas, the shared delta, and the FFN itself as frozen base."""

    def deltas(n: int) -> LoRAExperts:
        return LoRAExperts.for_ffn(mlp, n, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                   targets=cfg.lora_targets)

    return {"experts": deltas(num_experts), "shared": deltas(1) if cfg.shared_expert else None,
            "base": mlp}


def _full_parts(mlp: nn.Module, cfg: AnyConfig, num_experts: int) -> dict:
    shared, scale = _shared_and_scale(mlp, cfg.shared_expert)
    return {"experts": Experts.upcycle(mlp, num_experts, scale), "shared": shared}


def _parts(mlp: nn.Module, cfg: AnyConfig, num_experts: int) -> dict:
    return (_lora_parts if cfg.experts == "lora" else _full_parts)(mlp, cfg, num_experts)


def mose_block(mlp: nn.Module, cfg: MoSEConfig, state: RoutingState, index: int,
                level: int) -> MoSEBlock:
    num_skills = len(cfg.taxonomy.levels[level].skills)
    per_skill = 2 if cfg.modality_groups else 1
    weight = mlp.gate_proj.weight
    block_class = LoRAMoSEBlock if cfg.experts == "lora" else MoSEBlock
    return block_class(
        router=Router(weight.shape[1], num_skills, device=weight.device),
        **_parts(mlp, cfg, num_skills * per_skill),
        state=state,
        layer_idx=index,
        level=level,
        top_k=cfg.top_k,
        modality_groups=cfg.modality_groups,
    )


def token_moe_block(mlp: nn.Module, cfg: TokenMoEConfig, state: RoutingState,
                     index: int) -> TokenMoEBlock:
    weight = mlp.gate_proj.weight
    block_class = LoRATokenMoEBlock if cfg.experts == "lora" else TokenMoEBlock
    return block_class(
        router=Router(weight.shape[1], cfg.num_experts, device=weight.device),
        **_parts(mlp, cfg, cfg.num_experts),
        state=state,
        layer_idx=index,
        top_k=cfg.top_k,
    )
