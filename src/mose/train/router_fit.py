"""The router stage: skill routers fitted to convergence on the pooled inputs they read.

The rest of the model is frozen, so what each router reads is fixed: one
forward pass (no grad, routes forced to the labels, stopped after the last
MoSE layer) gives every labelled sample's pooled input at every MoSE layer,
and the routers then train on those cached inputs alone, epoch after epoch,
at the cost of a few small matrix products per step:

1. pool: the labelled training and held-out samples' router inputs, (N, H) per layer,
   from a forward in each of the stage's `precisions` (the dtypes the model will answer
   in: a bf16 forward moves the pooled inputs by about as much as skills differ);
2. standardise: each router's input statistics, fitted on the training inputs and
   saved with the model (see `Router`);
3. fit: AdamW on the mean skill cross-entropy over layers (DESIGN §6) on the inputs of
   every precision, scored on the held-out inputs after every epoch (the mean over
   precisions); the best epoch's routers are kept, and the fit stops once `patience`
   epochs bring no better one (or at `epochs` / `max_steps`);
4. measure: the kept routers' held-out accuracy with their own routes (as predictions
   and `mose analyze` read skill chains) in each precision, how often the precisions
   choose the same chain, and the ceiling of a linear probe fitted on the first
   precision's inputs (`mose.probe`).

Under several processes each pools its share of the samples and all of them
gather the whole set, then fit the same routers from the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from transformers import get_scheduler

from mose.data.collate import Collator, EncodedDataset
from mose.layers import MoSEBlock, expert_blocks, skill_routing_loss
from mose.models.device import DTYPES
from mose.probe import probe_accuracy
from mose.train.loop import SCHEDULES, LoopContext, StageLogger, adamw, freeze_all_but
from mose.train.precision import held_in, weights
from mose.train.recipe import RouterStage

TIE = 1e-9  # held-out accuracies closer than this are equal


@dataclass
class PooledInputs:
    """The router inputs of a set of labelled samples, at every MoSE layer."""

    features: dict[int, torch.Tensor]  # layer → (N, H) float32
    labels: torch.Tensor  # (N, L) long

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def joined(cls, parts: list[PooledInputs]) -> PooledInputs:
        """Several sets of inputs as one (each sample once per set)."""
        return cls({k: torch.cat([p.features[k] for p in parts]) for k in parts[0].features},
                   torch.cat([p.labels for p in parts]))


def pool_in_precisions(model: nn.Module, dataset: EncodedDataset, collator: Collator, batch_size: int,
                       acc: Accelerator, precisions: list[str]) -> dict[str, PooledInputs]:
    """`pool_inputs` from a forward in each precision (the weights held in it meanwhile)."""
    pooled = {}
    for name in precisions:
        with held_in(weights(model), DTYPES[name]):
            pooled[name] = pool_inputs(model, dataset, collator, batch_size, acc)
    return pooled


@torch.no_grad()
def pool_inputs(model: nn.Module, dataset: EncodedDataset, collator: Collator, batch_size: int,
                acc: Accelerator) -> PooledInputs:
    """Every sample's pooled input at every MoSE layer, with routes forced to its labels
    (each router sees the hidden states the model will have once the routers before it
    choose right). Each process pools samples rank, rank + world, ...; all get every sample."""
    model.eval()
    mine = list(range(acc.process_index, len(dataset), acc.num_processes))
    features: dict[int, list[torch.Tensor]] = {}
    labels = []
    for start in range(0, len(mine), batch_size):
        batch = collator([dataset[i] for i in mine[start:start + batch_size]])
        batch = {k: v.to(acc.device) for k, v in batch.items() if k != "labels"}
        with model.routing_only():
            model(**batch, use_cache=False)
        for layer, pooled in model.mose_state.router_inputs.items():
            features.setdefault(layer, []).append(pooled.float())
        labels.append(batch["skill_labels"])
    pooled = PooledInputs({k: torch.cat(v) for k, v in features.items()}, torch.cat(labels))
    return _gather(pooled, len(dataset), acc) if acc.num_processes > 1 else pooled


def _gather(local: PooledInputs, total: int, acc: Accelerator) -> PooledInputs:
    """Every process's share, back in dataset order: sample i came from rank i % world."""
    world, per_rank = acc.num_processes, math.ceil(total / acc.num_processes)

    def gather(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros((per_rank, *x.shape[1:]))
        padded[:len(x)] = x
        rows = acc.gather(padded).view(world, per_rank, *x.shape[1:])  # (W, per_rank, ...)
        return rows.transpose(0, 1).reshape(world * per_rank, *x.shape[1:])[:total]  # (N, ...)

    return PooledInputs({k: gather(v) for k, v in local.features.items()}, gather(local.labels))


def fit_routers(model: nn.Module, name: str, stage: RouterStage, dataset: EncodedDataset,
                held_out: EncodedDataset, ctx: LoopContext) -> dict[str, float]:
    """Run the router stage on `model` in place; its metrics (last loss, held-out accuracies)."""
    acc = ctx.accelerator
    blocks = [b for b in expert_blocks(model) if isinstance(b, MoSEBlock)]
    if not blocks:
        raise ValueError(f"stage {name!r}: router pretraining needs a MoSE model, not the token-MoE baseline")
    if len(held_out) == 0:
        raise ValueError(f"stage {name!r}: no held-out labelled samples to choose the routers' epoch by; "
                         "raise eval_size or set data.eval")
    train = pool_in_precisions(model, dataset, ctx.collator, stage.batch_size, acc, stage.precisions)
    held = pool_in_precisions(model, held_out, ctx.collator, stage.batch_size, acc, stage.precisions)
    every = PooledInputs.joined(list(train.values()))
    for block in blocks:
        block.router.fit_standardisation(every.features[block.layer_idx])
    levels = {b.layer_idx: b.level for b in blocks}
    routers = {b.layer_idx: b.router for b in blocks}
    for layer, router in routers.items():
        router.fit_coordinates = precision_whitening(router, [p.features[layer] for p in train.values()])
    try:
        metrics = _fit(model, routers, levels, train, held, stage, ctx, name)
    finally:
        for router in routers.values():
            router.fold_coordinates()
    first = stage.precisions[0]
    metrics.update(_probe_ceiling(model, levels, train[first], held[first]))
    metrics.update(chain_accuracy(model, held_out, ctx.collator, stage.batch_size, stage.precisions))
    return metrics


def _fit(model: nn.Module, routers: dict[int, nn.Module], levels: dict[int, int],
         train: dict[str, PooledInputs], held: dict[str, PooledInputs], stage: RouterStage,
         ctx: LoopContext, name: str) -> dict[str, float]:
    named = freeze_all_but(model, list(routers.values()))
    params = [p for _, p in named]
    samples = len(next(iter(train.values())))
    # batch_size is per process, as in every stage: each step fits the global batch's samples.
    batch = min(stage.batch_size * ctx.accelerator.num_processes, samples)
    steps_per_epoch = samples // batch
    total = stage.max_steps or max(1, round(stage.epochs * steps_per_epoch))
    optimizer = adamw(params, stage.lr, stage.weight_decay)
    scheduler = get_scheduler(SCHEDULES[stage.schedule], optimizer, num_training_steps=total,
                              num_warmup_steps=math.ceil(stage.warmup_ratio * total))
    generator = torch.Generator().manual_seed(ctx.seed)
    logger = StageLogger(ctx, name, total, 0)
    best = -1.0  # held-out accuracy
    best_state, best_epoch, stale, step = None, 0, 0, 0
    last: dict[str, float] = {}
    try:
        for epoch in range(1, math.ceil(total / steps_per_epoch) + 1):
            order = torch.randperm(samples, generator=generator)
            for rows in order[:steps_per_epoch * batch].view(steps_per_epoch, batch):  # (steps, B)
                loss = precisions_loss(routers, levels, train, rows, stage.consistency)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm or math.inf)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last = {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
                if step % stage.log_every == 0:
                    logger.log(step, last, samples=batch)
                else:
                    logger.advance(step, batch)
                if step == total:
                    break
            score = _held_out(routers, levels, held)
            logger.write(step, {"epoch": epoch, **score})
            # Patience counts epochs without a better held-out accuracy; an epoch that ties the
            # best replaces it (it has trained longer, so it routes with more confidence).
            stale = 0 if score["held_out_acc"] > best + TIE else stale + 1
            if score["held_out_acc"] >= best - TIE:
                best, best_epoch = max(best, score["held_out_acc"]), epoch
                best_state = {k: {n: t.clone() for n, t in r.state_dict().items()}
                              for k, r in routers.items()}
            if step == total or stale >= stage.patience:
                break
    finally:
        logger.close()
        model.eval()
    for layer, state in best_state.items():
        routers[layer].load_state_dict(state)
    return {**last, "epochs": float(epoch), "best_epoch": float(best_epoch)}


@torch.no_grad()
def precision_whitening(router: nn.Module, inputs: list[torch.Tensor],
                        floor: float = 1e-3) -> torch.Tensor | None:
    """Coordinates for fitting `router` in which what the precision moves is shrunk, (H, H).

    inputs: the same samples' pooled inputs in each precision, (N, H) each. The differences
    from the first precision, standardised as the router reads them, span directions of their
    own (a bf16 forward's rounding is not spread evenly); along a direction whose difference
    variance is λ, the coordinates scale by sqrt(φ / (λ + φ)) with φ = `floor` × the largest λ,
    so that the strongest directions of precision noise all but vanish while the fit runs, and
    a small step of the optimiser cannot lean on them. A router's function class is the same
    in any coordinates: the fit folds them into its weight when it ends (`Router.fold_coordinates`).
    """
    if len(inputs) < 2:
        return None
    first = router.standardise(inputs[0])  # (N, H)
    moved = torch.cat([router.standardise(x) - first for x in inputs[1:]]).double()  # (N·(P-1), H)
    variance, basis = torch.linalg.eigh(moved.T @ moved / len(moved))  # (H,), (H, H): columns
    variance = variance.clamp(min=0)
    scale = (floor * variance.max() / (variance + floor * variance.max())).sqrt()  # (H,)
    return ((basis * scale) @ basis.T).float()  # (H, H), symmetric


def precisions_loss(routers: dict[int, nn.Module], levels: dict[int, int], inputs: dict[str, PooledInputs],
                    rows: torch.Tensor, consistency: float) -> torch.Tensor:
    """The skill loss on `rows` of every precision's inputs (their mean), plus `consistency` times
    the mean squared gap between a router's logits on a sample's first-precision inputs and on its
    others. The gap penalty makes the routers read along directions where the precisions agree:
    a sample near a boundary then stays on the side it is on whatever precision answers it."""
    logits = {p: {k: router(x.features[k][rows.to(x.labels.device)]) for k, router in routers.items()}
              for p, x in inputs.items()}  # precision → layer → (B, S)
    losses = [skill_routing_loss(logits[p], levels, x.labels[rows.to(x.labels.device)])
              for p, x in inputs.items()]
    first, *others = logits.values()
    gaps = [(other[k] - first[k]).square().mean() for other in others for k in first]
    loss = sum(losses) / len(losses)
    return loss + consistency * sum(gaps) / len(gaps) if gaps else loss


def pooled_skill_loss(routers: dict[int, nn.Module], levels: dict[int, int], inputs: PooledInputs,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """The routers' skill loss (`skill_routing_loss`) on cached inputs: `rows` of them, or all."""
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])
    logits = {k: router(pick(inputs.features[k])) for k, router in routers.items()}  # (B, S) each
    return skill_routing_loss(logits, levels, pick(inputs.labels))


@torch.no_grad()
def _held_out(routers: dict[int, nn.Module], levels: dict[int, int],
              held: dict[str, PooledInputs]) -> dict[str, float]:
    """Per-layer accuracy on the held-out inputs of each precision (upstream routes forced
    right); their mean over layers and precisions, which chooses the epoch, and the loss."""
    scores: dict[str, float] = {}
    for precision, inputs in held.items():
        right = {k: router(inputs.features[k]).argmax(-1) == inputs.labels[:, levels[k]]  # (N,)
                 for k, router in routers.items()}
        accuracy = {k: float(r.float().mean()) for k, r in right.items()}
        scores[f"held_out_acc/{precision}"] = sum(accuracy.values()) / len(accuracy)
        scores.update({f"held_out_acc/{precision}/layer_{k}": v for k, v in accuracy.items()})
    means = [scores[f"held_out_acc/{p}"] for p in held]
    loss = pooled_skill_loss(routers, levels, PooledInputs.joined(list(held.values())))
    return {"held_out_acc": sum(means) / len(means), "held_out_loss": loss.item(), **scores}


def _probe_ceiling(model: nn.Module, levels: dict[int, int], train: PooledInputs,
                   held: PooledInputs) -> dict[str, float]:
    """Per level, the best held-out accuracy of a linear probe on one of its layers' inputs."""
    taxonomy = model.mose_config.taxonomy
    ceiling: dict[str, float] = {}
    for layer, level in levels.items():
        name = taxonomy.levels[level].name
        value = probe_accuracy(train.features[layer].cpu(), train.labels[:, level].cpu(),
                               held.features[layer].cpu(), held.labels[:, level].cpu(),
                               len(taxonomy.levels[level].skills))
        ceiling[name] = max(ceiling.get(name, 0.0), value)
    return {f"probe_acc/{k}": v for k, v in ceiling.items()}


def chain_accuracy(model: nn.Module, dataset: EncodedDataset, collator: Collator, batch_size: int,
                   precisions: list[str]) -> dict[str, float]:
    """The routers' own choices on held-out samples in each precision (`router_accuracy`: the
    first precision's as `router_acc/...`, the others' as `router_acc/PRECISION/...`), and how
    often every precision chooses the same whole chain (`router_acc/agree`)."""
    metrics: dict[str, float] = {}
    chosen = []
    for i, precision in enumerate(precisions):
        with held_in(weights(model), DTYPES[precision]):
            choices, labels = held_out_chains(model, dataset, collator, batch_size)
        prefix = "router_acc/" if i == 0 else f"router_acc/{precision}/"
        levels = model.mose_config.taxonomy.level_names
        metrics.update({prefix + k: v for k, v in router_accuracy(choices, labels, levels).items()})
        chosen.append(choices)
    if len(chosen) > 1 and len(dataset):
        metrics["router_acc/agree"] = float(torch.stack([(c == chosen[0]).all(1) for c in chosen]).all(0)
                                            .float().mean())
    return metrics


@torch.no_grad()
def held_out_chains(model: nn.Module, dataset: EncodedDataset, collator: Collator,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the routers' own chains, the labels), (N, L) skill indices each, read as `mose analyze` and
    every prediction read skill chains (a level's skill is its layers' majority)."""
    model.eval()
    taxonomy = model.mose_config.taxonomy
    device = next(model.parameters()).device
    chosen, labels = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels.append(batch.pop("skill_labels"))  # (B, L): taken out, so the routers choose alone
        with model.routing_only():
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        chosen.append(torch.tensor([taxonomy.encode(c.as_dict()) for c in model.skill_chains()]))  # (B, L)
    empty = torch.empty(0, len(taxonomy.levels), dtype=torch.long)
    return (torch.cat(chosen), torch.cat(labels)) if chosen else (empty, empty)


def router_accuracy(chosen: torch.Tensor, labels: torch.Tensor, levels: list[str]) -> dict[str, float]:
    """Accuracy of chosen chains (N, L) against labels (N, L): per level, and of whole chains."""
    if len(labels) == 0:
        return {}
    hits = chosen == labels  # (N, L)
    return {**{level: float(hits[:, i].float().mean()) for i, level in enumerate(levels)},
            "chain": float(hits.all(dim=1).float().mean())}
