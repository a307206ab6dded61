"""The training stages: what each one trains and the loss it trains with.

- backbone: the dense model on answers (all of it, the language model, or the FFNs);
- router:   only the routers, on skill labels (`mose.train.router_fit`);
- sft:      only the MoSE (or token-MoE) blocks, on answers, plus the optional
            skill loss (MoSE) or the load-balancing loss (token MoE).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mose.arch import arch_of
from mose.config import MoSEConfig, resolve_layers
from mose.data.collate import IGNORE, EncodedDataset
from mose.layers import MoSEBlock, expert_blocks, skill_routing_loss
from mose.train.loop import Objective, StagePlan
from mose.train.recipe import BackboneStage, SFTStage


def backbone_plan(name: str, model: nn.Module, stage: BackboneStage, dataset: EncodedDataset) -> StagePlan:
    arch = arch_of(model)
    frozen: list[nn.Module] = []
    own_lr: list[tuple[nn.Module, float]] = []
    if stage.trainable == "ffn":
        layers = arch.layers(model)
        trainable = [layers[i].mlp for i in resolve_layers(stage.layers, len(layers))]
    else:
        trainable = [model]
        vision = arch.vision_tower(model)
        if stage.trainable == "language" and vision is not None:
            frozen = [vision]
        if stage.vision_lr is not None:
            if vision is None:  # a Hub model, which the recipe check could not look at
                raise ValueError(f"stage {name!r}: vision_lr is set but the model has no vision tower")
            own_lr = [(vision, stage.vision_lr)]
    return StagePlan(name, stage, dataset, trainable, answer_objective(model), frozen=frozen, own_lr=own_lr)


def sft_plan(name: str, model: nn.Module, stage: SFTStage, dataset: EncodedDataset) -> StagePlan:
    blocks = expert_blocks(model)
    if not blocks:
        raise ValueError(f"stage {name!r}: the model has no MoSE or token-MoE blocks: convert it first")
    frozen = [] if trains_routers(model, stage) else [b.router for b in blocks]
    coef = getattr(model.mose_config, "aux_loss_coef", 0.0)
    objective = answer_objective(model, stage.skill_loss_weight, stage.teacher_forcing, coef)
    return StagePlan(name, stage, dataset, list(blocks), objective, frozen=frozen)


def trains_routers(model: nn.Module, stage: SFTStage) -> bool:
    """Whether SFT trains the routers: as the stage says, else the token MoE's always (nothing
    else trains them) and MoSE's only beside the skill loss. Without it, the task loss alone
    moves pretrained skill routers off the labels they fit (through the top-1 weight's
    gradient), so the routes SFT trains on drift away from the skills they stand for."""
    if stage.train_routers is not None:
        return stage.train_routers
    return not isinstance(model.mose_config, MoSEConfig) or stage.skill_loss_weight > 0


def answer_objective(model: nn.Module, skill_loss_weight: float = 0.0, teacher_forcing: bool = False,
                     aux_loss_coef: float = 0.0) -> Objective:
    """Cross-entropy summed over answer tokens, plus the auxiliary routing losses.

    The LM head runs at the positions that predict an answer token only (`logits_at`).
    MoSE's routers average over the prompt only, as they do when answering with
    `decode_routing="once"`: a route that read the answer would be one inference never
    takes. ("running" routing reads the answer as it is generated, so it reads it here too.)
    """
    config = getattr(model, "mose_config", None)
    routes_per_sample = isinstance(config, MoSEConfig) and config.decode_routing == "once"
    head = model.get_output_embeddings()

    def objective(runner: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "skill_labels")}
        if routes_per_sample:
            inputs["routing_mask"] = batch["attention_mask"].bool() & (batch["labels"] == IGNORE)  # (B, T)
        if teacher_forcing:
            inputs["skill_labels"] = batch["skill_labels"]
        targets = batch["labels"][:, 1:]  # (B, T-1): token t predicts t+1
        predicting = targets != IGNORE  # (B, T-1)
        with logits_at(head, F.pad(predicting, (0, 1))):  # (B, T): the last token predicts nothing
            out = runner(**inputs)
        logits = out.logits.float()  # (N, V), N = answer tokens
        loss = F.cross_entropy(logits, targets[predicting], reduction="sum")
        tokens = predicting.sum()
        if skill_loss_weight:
            # Each answer token carries its sample's skill loss, so the loop's division by the
            # global token count gives the same loss however the batch is split over processes.
            per_sample = detached_skill_loss(model, batch["skill_labels"], per_sample=True)  # (B,)
            loss = loss + skill_loss_weight * (predicting.sum(1) * per_sample).sum()
        if aux_loss_coef and out.get("aux_loss") is not None:
            loss = loss + aux_loss_coef * tokens * out["aux_loss"]
        return loss

    return objective


@contextmanager
def logits_at(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Forwards inside apply the LM head `head` at the positions `keep` (B, T) bool only, and
    return logits (N, V) for the N kept positions, in order. A loss on answer tokens needs
    no other logits, and at a real vocabulary those are a training step's largest activation
    (151,936 floats a token for Qwen2-VL, before the loss's float32 copy)."""

    def select(_head: nn.Module, args: tuple) -> tuple:
        return (args[0][keep], *args[1:])  # (B, T, H) -> (N, H)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def detached_skill_loss(model: nn.Module, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """The routers' skill loss on the pooled inputs they read, detached: it trains the
    routers only, never (through those inputs) the experts below them."""
    pooled = model.mose_state.router_inputs
    logits = {b.layer_idx: b.router(pooled[b.layer_idx].detach())  # (B, S) each
              for b in expert_blocks(model) if isinstance(b, MoSEBlock)}
    return skill_routing_loss(logits, model.level_of_layer, labels, per_sample)
