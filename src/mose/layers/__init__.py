"""Layers: routers, stacked experts (full or LoRA), the MoSE and token-MoE blocks, router losses."""

from mose.layers.blocks import (
    ExpertBlock,
    LoRAMoSEBlock,
    LoRATokenMoEBlock,
    MoSEBlock,
    TokenMoEBlock,
    expert_blocks,
)
from mose.layers.experts import Experts
from mose.layers.lora import LoRAExperts
from mose.layers.losses import load_balancing_loss, skill_routing_loss
from mose.layers.router import Router, top_k

__all__ = ["ExpertBlock", "Experts", "LoRAExperts", "LoRAMoSEBlock", "LoRATokenMoEBlock", "MoSEBlock",
           "Router", "TokenMoEBlock", "expert_blocks", "load_balancing_loss", "skill_routing_loss",
           "top_k"]
