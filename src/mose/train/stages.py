"""The training stages: what each one trains and the loss it trains with.

- backbone: the dense model on answers (all of it, the language model, or the FFNs);
- router:   only the routers, on skill labels, from the mean hidden states the
            frozen model computes under no_grad: no backward through the model;
- sft:      only the MoSE (or token-MoE) blocks, on answers, plus the optional
            skill loss (MoSE) or the load-balancing loss (token MoE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mose.arch import arch_of
from mose.config import MoSEConfig, resolve_layers
from mose.data.collate import IGNORE, Collator, EncodedDataset
from mose.layers import MoSEBlock, expert_blocks, skill_routing_loss
from mose.train.loop import Objective, StagePlan
from mose.train.recipe import BackboneStage, RouterStage, SFTStage


def backbone_plan(name: str, model: nn.Module, stage: BackboneStage, dataset: EncodedDataset) -> StagePlan:
    arch = arch_of(model)
    frozen: list[nn.Module] = []
    if stage.trainable == "ffn":
        layers = arch.layers(model)
        trainable = [layers[i].mlp for i in resolve_layers(stage.layers, len(layers))]
    else:
        trainable = [model]
        vision = arch.vision_tower(model)
        if stage.trainable == "language" and vision is not None:
            frozen = [vision]
    return StagePlan(name, stage, dataset, trainable, answer_objective(model), frozen=frozen)


def sft_plan(name: str, model: nn.Module, stage: SFTStage, dataset: EncodedDataset) -> StagePlan:
    blocks = expert_blocks(model)
    if not blocks:
        raise ValueError(f"stage {name!r}: the model has no MoSE or token-MoE blocks: convert it first")
    frozen = [] if stage.train_routers else [b.router for b in blocks]
    coef = getattr(model.mose_config, "aux_loss_coef", 0.0)
    objective = answer_objective(model, stage.skill_loss_weight, stage.teacher_forcing, coef)
    return StagePlan(name, stage, dataset, list(blocks), objective, frozen=frozen)


def router_plan(name: str, model: nn.Module, stage: RouterStage, dataset: EncodedDataset,
                held_out: EncodedDataset, collator: Collator) -> StagePlan:
    if not isinstance(model.mose_config, MoSEConfig):
        raise ValueError(f"stage {name!r}: router pretraining needs a MoSE model, not the token-MoE baseline")
    routers = [b.router for b in expert_blocks(model)]
    return StagePlan(name, stage, dataset, routers, router_objective(model), distribute=False,
                     evaluate=lambda m: router_accuracy(m, held_out, collator, stage.batch_size))


def answer_objective(model: nn.Module, skill_loss_weight: float = 0.0, teacher_forcing: bool = False,
                     aux_loss_coef: float = 0.0) -> Objective:
    """Cross-entropy summed over answer tokens, plus the auxiliary routing losses.

    MoSE's routers average over the prompt only, as they do when answering with
    `decode_routing="once"`: a route that read the answer would be one inference never
    takes. ("running" routing reads the answer as it is generated, so it reads it here too.)
    """
    config = getattr(model, "mose_config", None)
    routes_per_sample = isinstance(config, MoSEConfig) and config.decode_routing == "once"

    def objective(runner: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "skill_labels")}
        if routes_per_sample:
            inputs["routing_mask"] = batch["attention_mask"].bool() & (batch["labels"] == IGNORE)  # (B, T)
        if teacher_forcing:
            inputs["skill_labels"] = batch["skill_labels"]
        out = runner(**inputs)
        labels = batch["labels"][:, 1:]  # (B, T-1): token t predicts t+1
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        tokens = (labels != IGNORE).sum()
        if skill_loss_weight:
            # Each answer token carries its sample's skill loss, so the loop's division by the
            # global token count gives the same loss however the batch is split over processes.
            per_sample = detached_skill_loss(model, batch["skill_labels"], per_sample=True)  # (B,)
            loss = loss + skill_loss_weight * ((labels != IGNORE).sum(1) * per_sample).sum()
        if aux_loss_coef and out.get("aux_loss") is not None:
            loss = loss + aux_loss_coef * tokens * out["aux_loss"]
        return loss

    return objective


def detached_skill_loss(model: nn.Module, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """The routers' skill loss on the pooled inputs they read, detached: it trains the
    routers only, never (through those inputs) the experts below them."""
    pooled = model.mose_state.router_inputs
    logits = {b.layer_idx: b.router(pooled[b.layer_idx].detach())  # (B, S) each
              for b in expert_blocks(model) if isinstance(b, MoSEBlock)}
    return skill_routing_loss(logits, model.level_of_layer, labels, per_sample)


def router_objective(model: nn.Module) -> Objective:
    """The routers' skill loss on the pooled inputs of a no_grad forward (summed over samples)."""

    def objective(_runner: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["skill_labels"]  # (B, L)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "skill_labels")}
        # Routes forced to the labels: each router sees the hidden states the model
        # will have once the routers before it choose right.
        with torch.no_grad(), model.routing_only():
            model(**inputs, skill_labels=labels)
        return detached_skill_loss(model, labels, per_sample=True).sum()

    return objective


@torch.no_grad()
def router_accuracy(model: nn.Module, dataset: EncodedDataset, collator: Collator,
                    batch_size: int) -> dict[str, float]:
    """Held-out accuracy of the routers' own choices, read as skill chains (a level's skill is
    its layers' majority, as `mose analyze` and every prediction report it): per level and whole."""
    model.eval()
    taxonomy = model.mose_config.taxonomy
    device = next(model.parameters()).device
    right = torch.zeros(len(taxonomy.levels))
    chains = count = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("skill_labels")  # (B, L): taken out, so the routers choose alone
        with model.routing_only():
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        chosen = torch.tensor([taxonomy.encode(c.as_dict()) for c in model.skill_chains()])  # (B, L)
        hits = chosen == labels  # (B, L)
        right += hits.sum(dim=0)
        chains += int(hits.all(dim=1).sum())
        count += labels.shape[0]
    if count == 0:
        return {}
    metrics = {f"router_acc/{level}": float(right[i] / count) for i, level in enumerate(taxonomy.level_names)}
    metrics["router_acc/chain"] = chains / count
    return metrics
