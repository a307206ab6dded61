"""A recipe's stages, estimated one by one on the meta-device model they train.

Each stage gets its exact parameter counts (the meta model, converted where the
recipe converts, frozen as the stage's plan freezes it), its micro-batch shape
(batch size; tokens = data.max_length, image tokens from data.max_pixels) and
its bytes per GPU under every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mose.arch import arch_of
from mose.config import resolve_layers
from mose.convert import convert
from mose.estimate.activations import FP32, ActivationBytes, MicroBatch, activation_bytes, forward_bytes
from mose.estimate.models import (
    ModelFacts,
    active_params,
    count,
    meta_model,
    model_facts,
    mose_blocks,
    trainable_params,
)
from mose.estimate.sharding import STRATEGIES, PerGPU, StateBytes, per_gpu, state_bytes
from mose.train.loop import freeze_all_but
from mose.train.precision import weights
from mose.train.recipe import BackboneStage, ConvertStage, Recipe, RouterStage, SFTStage
from mose.train.stages import backbone_plan, sft_plan

DEFAULT_TEXT_TOKENS = 512  # assumed when data.max_length is not set
# Answer tokens per sample assumed (the LM head runs at those positions only): CODA-LM's longest
# answers, scene descriptions, run to a few hundred words.
DEFAULT_ANSWER_TOKENS = 512


@dataclass
class StageEstimate:
    name: str
    kind: str
    total: int
    trainable: int
    active: int
    shape: MicroBatch | None
    checkpointing: bool
    activations: ActivationBytes
    state: StateBytes
    gpus: list[PerGPU]
    notes: list[str] = field(default_factory=list)

    def fits(self, strategy: str, gpu_gb: float) -> bool:
        return next(g for g in self.gpus if g.strategy == strategy).fits(gpu_gb)


def estimate_recipe(recipe: Recipe, gpus: int = 1,
                    answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[StageEstimate]:
    """Every stage of the recipe, in order, on `gpus` GPUs, with answers of `answer_tokens` tokens."""
    model, max_pixels = meta_model(recipe.model)
    shape, notes = micro_shape(recipe, model_facts(model), max_pixels, batch=1)
    answer_tokens = min(answer_tokens, shape.seq - 1)
    notes.append(f"answers of {answer_tokens} tokens a sample (--answer-tokens): the LM head runs there only")
    weight_bytes = 4 if recipe.dtype == "float32" else 2
    act_bytes = 4 if recipe.mixed_precision == "no" and recipe.dtype == "float32" else 2
    # bf16 mixed precision ("auto" on a GPU that has it) holds a stage's frozen weights in bf16
    held_bytes = 2 if recipe.dtype == "float32" and recipe.mixed_precision in ("auto", "bf16") else None
    estimates = []
    for name, stage in recipe.stages.items():
        if isinstance(stage, ConvertStage):
            convert(model, stage.config())
            model.requires_grad_(False)
            estimates.append(_estimate(name, stage.stage, model, None, False, ActivationBytes(0, 0, 0),
                                       weight_bytes, gpus, ["no training: the converted weights"]))
            continue
        batch = MicroBatch(stage.batch_size, shape.seq, shape.image_tokens, stage.batch_size * answer_tokens)
        estimates.append(estimate_stage(name, stage, model, batch, weight_bytes, act_bytes, gpus, notes,
                                        held_bytes))
    return estimates


def estimate_stage(name: str, stage, model: nn.Module, batch: MicroBatch, weight_bytes: int,
                   act_bytes: int = 2, gpus: int = 1, notes: list[str] = (),
                   held_bytes: int | None = None) -> StageEstimate:
    """One training stage on `model` (frozen here as the stage freezes it) at micro-batch `batch`.
    `held_bytes`: what a training stage's frozen weights are held in (None: `weight_bytes`)."""
    facts = model_facts(model)
    trained_from, ffns, extra = _freeze_for(name, model, stage)
    held = 0
    if isinstance(stage, RouterStage):
        # One no-grad forward pools the router inputs; the fit then runs on the cached inputs.
        peak = forward_bytes(facts, batch, act_bytes)
        acts = ActivationBytes(peak, peak, 0)
    else:
        if held_bytes is not None:
            held = sum(p.numel() for p in weights(model, frozen_only=True))
        residual = held_bytes or FP32  # bf16 frozen embeddings: a bf16 residual stream
        acts = activation_bytes(facts, batch, trained_from, ffns, act_bytes, residual)
    return _estimate(name, stage.stage, model, batch, stage.grad_checkpointing, acts, weight_bytes, gpus,
                     [*notes, *extra], held, held_bytes or weight_bytes)


def micro_shape(recipe: Recipe, facts: ModelFacts, max_pixels: int,
                batch: int) -> tuple[MicroBatch, list[str]]:
    """Tokens per sample: data.max_length (a micro-batch pads to its longest sample), one image."""
    pixels = min(recipe.data.max_pixels or max_pixels, max_pixels)
    image_tokens = pixels // (facts.patch * facts.merge) ** 2 if facts.merge > 1 else 0
    notes = []
    seq = recipe.data.max_length
    if seq is None:
        seq = image_tokens + DEFAULT_TEXT_TOKENS
        notes.append(f"data.max_length unset: assumed {seq} tokens ({image_tokens} image + "
                     f"{DEFAULT_TEXT_TOKENS} text)")
    return MicroBatch(batch, seq, image_tokens), notes


def _freeze_for(name: str, model: nn.Module, stage) -> tuple[int | None, frozenset[int], list[str]]:
    """Freeze the meta model as the stage will; (first trained decoder layer, trained dense FFNs, notes)."""
    layers = arch_of(model).layers(model)
    notes: list[str] = []
    if isinstance(stage, RouterStage):
        freeze_all_but(model, [b.router for b in mose_blocks(model)])
        return None, frozenset(), notes
    if isinstance(stage, SFTStage):
        plan = sft_plan(name, model, stage, None)
    elif isinstance(stage, BackboneStage):
        plan = backbone_plan(name, model, stage, None)
        if stage.trainable != "ffn":
            notes.append("trains attention and embeddings too: the inputs their projections save are not "
                         "counted" + ("; nor the vision tower's" if stage.trainable == "all" else ""))
    else:
        raise ValueError(f"stage {name!r}: nothing to estimate for {type(stage).__name__}")
    freeze_all_but(model, plan.trainable, plan.frozen)
    trained = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    ffns: frozenset[int] = frozenset()
    if isinstance(stage, BackboneStage):
        ffns = frozenset(resolve_layers(stage.layers, len(layers)) if stage.trainable == "ffn"
                         else range(len(layers)))
    first = min(trained) if trained else None
    if isinstance(stage, BackboneStage) and stage.trainable != "ffn":
        first = -1  # the embeddings train: every decoder layer's input needs a gradient
    return first, ffns, notes


def _estimate(name: str, kind: str, model: nn.Module, batch: MicroBatch | None, checkpointing: bool,
              acts: ActivationBytes, weight_bytes: int, gpus: int, notes: list[str], held: int = 0,
              held_bytes: int = 0) -> StageEstimate:
    total, trainable = count([model]), trainable_params(model)
    layers = arch_of(model).layers(model)
    in_layers = count(list(layers))
    largest_module = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                         default=0)
    state = state_bytes(total, trainable, weight_bytes, largest_layer=max(count([m]) for m in layers),
                        largest_module=largest_module, root=total - in_layers, held=held,
                        held_bytes=held_bytes)
    activations = acts.for_options(checkpointing)
    return StageEstimate(name=name, kind=kind, total=total, trainable=trainable, active=active_params(model),
                         shape=batch, checkpointing=checkpointing, activations=acts, state=state,
                         gpus=[per_gpu(state, activations, s, gpus) for s in STRATEGIES], notes=notes)
