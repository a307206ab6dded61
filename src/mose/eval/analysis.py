"""The numbers behind `mose analyze`: how alike a model's experts are, and how its routers route.

Expert diversity (the MoSE paper's "Diversity of expertise"): per MoE layer,
the cosine similarity of every pair of experts, each expert's weights
flattened to one vector (gate_up_proj, then down_proj); the shared expert is
one more row. Upcycled experts start as copies (similarity exactly 1), so how
far below 1 they get is how much training made them specialise.

Routing: on labelled sample records the routers choose for themselves (no
skill labels reach the model) and the chosen skill chains are compared with
the labels: per level the skill counts, the accuracy and a confusion matrix,
and how often the whole chain equals the labelled one. Beside the router's
accuracy, its ceiling: the held-out accuracy of a linear probe (`mose.probe`)
fitted on the same pooled hidden states the level's routers read.

    analysis = analyze_model(model, processor, read_jsonl("runs/world/test.jsonl"), name="mose")
    analysis.routing.level("perception").probe_accuracy

This module computes and holds the numbers; `mose.eval.report` renders them,
and `mose.eval.analyze` (the `mose analyze` command) loads models and files and
writes the report. Neither is imported here, not even lazily: the three import
one way, analysis <- report <- analyze (so the driver `analyze` is imported from
`mose.eval.analyze` only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mose.config import MoSEConfig, TokenMoEConfig
from mose.data.collate import LETTERS, Collator, SampleEncoder
from mose.data.schema import DataError, Sample
from mose.eval.batching import check_batch_size, is_mose
from mose.eval.chat import format_chain
from mose.eval.predict import eval_mode
from mose.eval.predictions import Prediction
from mose.eval.score.choice import parse_choice
from mose.eval.score.common import exact_match
from mose.layers.blocks import ExpertBlock, MoSEBlock, expert_blocks
from mose.layers.lora import LoRAExperts
from mose.models.device import model_device, to_device
from mose.probe import cross_validated_accuracy
from mose.routing import SkillChain
from mose.skills.taxonomy import Taxonomy

SHARED = "shared"
GRAM_CHUNK_ROWS = 1024  # weight rows per step of the Gram matrix: bounds memory on real models
MIN_PROBE_SAMPLES = 10  # fewer labelled samples than this: no probe ceiling (it would fit noise)
PROBE_FOLDS = 5


class AnalysisError(ValueError):
    """Something `mose analyze` cannot analyse: names the model or file and why."""


@dataclass(frozen=True)
class LayerSimilarity:
    """Cosine similarity of one MoE layer's experts, shared expert first when there is one."""

    layer: int
    level: str | None  # the MoSE level of the layer; None for token MoE
    labels: tuple[str, ...]  # one per row: "shared", skill names, "image:vru", or "e0", ...
    matrix: np.ndarray  # (E, E) float64

    @property
    def title(self) -> str:
        return f"layer {self.layer}" + (f" · {self.level}" if self.level else "")

    def routed_off_diagonal(self) -> np.ndarray:
        """Similarities between distinct routed experts (the shared expert left out)."""
        keep = [i for i, label in enumerate(self.labels) if label != SHARED]
        sub = self.matrix[np.ix_(keep, keep)]  # (R, R)
        return sub[~np.eye(len(keep), dtype=bool)]

    def to_dict(self) -> dict[str, Any]:
        pairs = self.routed_off_diagonal()
        return {"layer": self.layer, "level": self.level, "labels": list(self.labels),
                "matrix": self.matrix.round(6).tolist(),
                "mean_routed_similarity": float(pairs.mean()) if pairs.size else None,
                "min_routed_similarity": float(pairs.min()) if pairs.size else None}


def check_converted(model: Any, name: str = "model") -> None:
    """A clear error for a model with no experts (dense, or not converted by mose)."""
    if not isinstance(getattr(model, "mose_config", None), MoSEConfig | TokenMoEConfig):
        raise AnalysisError(f"{name}: a dense model has no experts to compare; analyze a converted "
                            "MoSE or token-MoE model (mose.convert, or a `mose train` stage after convert)")


def model_kind(model: Any) -> str:
    """"mose" or "token_moe"."""
    return model.mose_config.kind


def expert_labels(model: Any, block: ExpertBlock) -> tuple[str, ...]:
    """Row labels of a block's similarity matrix: "shared", then the routed experts in order."""
    if isinstance(block, MoSEBlock):
        skills = model.mose_config.taxonomy.levels[block.level].skills
        # Modality groups: expert 2s is skill s's image expert, 2s + 1 its text expert.
        routed = ([f"{modality}:{skill}" for skill in skills for modality in ("image", "text")]
                  if block.modality_groups else list(skills))
    else:
        routed = [f"e{i}" for i in range(block.experts.num_experts)]
    if len(routed) != block.experts.num_experts:
        raise AnalysisError(f"layer {block.layer_idx}: {block.experts.num_experts} experts but "
                            f"{len(routed)} labels ({', '.join(routed)})")
    return tuple(([SHARED] if block.shared_expert is not None else []) + routed)


Parts = list[tuple[torch.Tensor, torch.Tensor | None]]  # (stacked (E, rows, cols), shared (rows, cols))


def _full_parts(block: ExpertBlock) -> Parts:
    experts, shared = block.experts, block.shared_expert
    return [
        (experts.gate_up_proj, None if shared is None else
         torch.cat([shared.gate_proj.weight, shared.up_proj.weight])),  # (2I, H): the stacked layout
        (experts.down_proj, None if shared is None else shared.down_proj.weight),
    ]


@torch.no_grad()
def _lora_parts(block: ExpertBlock) -> Parts:
    """LoRA experts are compared by their dense deltas (scale · B A) per target: what each
    adds to the frozen FFN. (At conversion every delta is zero: no similarity to speak of.)"""
    experts, shared = block.experts, block.shared_expert
    parts: Parts = []
    for target in experts.targets:
        stacked = torch.stack([experts.delta_weight(target, e) for e in range(experts.num_experts)])
        parts.append((stacked, None if shared is None else shared.delta_weight(target, 0)))  # (E, out, in)
    return parts


def expert_gram(block: ExpertBlock, chunk_rows: int = GRAM_CHUNK_ROWS) -> torch.Tensor:
    """Gram matrix (E, E) float64 of the flattened experts, shared expert first.

    Accumulated over chunks of weight rows, so a real model's experts are
    never all copied to float64 at once. Every entry is one full-length sum
    of an elementwise product, computed the same way, where a matrix product
    (or a batched sum) splits entries differently: so experts that are copies
    have a cosine of exactly 1.
    """
    experts, shared = block.experts, block.shared_expert
    size = experts.num_experts + (shared is not None)
    parts = _lora_parts(block) if isinstance(experts, LoRAExperts) else _full_parts(block)
    gram = torch.zeros(size, size, dtype=torch.float64, device=parts[0][0].device)
    with torch.no_grad():
        for stacked, single in parts:
            for start in range(0, stacked.shape[1], chunk_rows):
                rows = stacked[:, start:start + chunk_rows].reshape(stacked.shape[0], -1)  # (E, c*C)
                if single is not None:
                    rows = torch.cat([single[start:start + chunk_rows].reshape(1, -1), rows])  # (1+E, c*C)
                rows = rows.double()
                for i in range(size):
                    for j in range(i, size):
                        gram[i, j] += (rows[i] * rows[j]).sum()
    return gram.triu() + gram.triu(1).T  # (E, E): mirror the upper triangle


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (E, E) from a Gram matrix; an all-zero expert is similar to nothing."""
    squares = gram.diagonal().clamp(min=0)  # (E,)
    # sqrt(|a|^2 |b|^2), not |a| |b|: for a copy, sqrt(x * x) is exactly x, sqrt(x) ** 2 may not be.
    denom = (squares[:, None] * squares[None, :]).sqrt().clamp(min=torch.finfo(gram.dtype).tiny)  # (E, E)
    return (gram / denom).clamp(-1.0, 1.0)


def expert_similarity(model: Any, name: str = "model") -> list[LayerSimilarity]:
    """Per MoE layer of a converted model, the cosine similarity of its experts."""
    check_converted(model, name)
    levels = model.mose_config.taxonomy.levels if isinstance(model.mose_config, MoSEConfig) else None
    out = []
    for block in expert_blocks(model):
        level = levels[block.level].name if isinstance(block, MoSEBlock) and levels else None
        matrix = cosine_from_gram(expert_gram(block)).cpu().numpy()
        out.append(LayerSimilarity(block.layer_idx, level, expert_labels(model, block), matrix))
    return out


@dataclass
class LevelRouting:
    """One level's routing on a data set: counts per skill, and chosen against labelled."""

    level: str
    skills: tuple[str, ...]
    chosen: list[int]  # (S,) samples per chosen skill, over all samples
    labelled: list[int]  # (S,) samples per labelled skill, over labelled samples
    confusion: list[list[int]]  # (S, S) [labelled][chosen], over labelled samples
    mean_prob: float | None  # mean router probability of the chosen skill
    # layer → held-out accuracy of a linear probe on the pooled inputs that layer's router read,
    # over labelled samples; empty when not probed (too few labels, or no router inputs)
    probe_by_layer: dict[int, float] = field(default_factory=dict)

    @property
    def correct(self) -> int:
        return sum(self.confusion[i][i] for i in range(len(self.skills)))

    @property
    def accuracy(self) -> float | None:
        """Fraction of labelled samples routed to their labelled skill; None without labels."""
        total = sum(self.labelled)
        return self.correct / total if total else None

    @property
    def probe_accuracy(self) -> float | None:
        """The level's linear-probe ceiling: its best layer's probe; None when not probed."""
        return max(self.probe_by_layer.values(), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"skills": list(self.skills), "chosen": dict(zip(self.skills, self.chosen, strict=True)),
                "labelled": dict(zip(self.skills, self.labelled, strict=True)),
                "accuracy": self.accuracy, "probe_accuracy": self.probe_accuracy,
                "probe_by_layer": {str(layer): acc for layer, acc in self.probe_by_layer.items()},
                "mean_prob": self.mean_prob,
                "confusion": {"rows": "labelled", "columns": "chosen", "counts": self.confusion}}


@dataclass
class RoutingStats:
    n: int  # samples routed
    n_labelled: int  # of which carry a skill label
    levels: list[LevelRouting]
    chain_matches: int  # labelled samples whose whole chosen chain is the labelled one

    @property
    def chain_accuracy(self) -> float | None:
        return self.chain_matches / self.n_labelled if self.n_labelled else None

    def level(self, name: str) -> LevelRouting:
        for level in self.levels:
            if level.level == name:
                return level
        raise KeyError(f"no level {name!r}; levels: {', '.join(lv.level for lv in self.levels)}")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "n_labelled": self.n_labelled, "chain_accuracy": self.chain_accuracy,
                "chain_matches": self.chain_matches,
                "by_level": {lv.level: lv.to_dict() for lv in self.levels}}


def routing_stats(chains: Sequence[SkillChain], samples: Sequence[Sample], taxonomy: Taxonomy,
                  source: str = "samples") -> RoutingStats:
    """Compare chosen skill chains with the samples' labels (unlabelled samples count as chosen only).

    `source` (the data file) is what an error about a bad label names.
    """
    if len(chains) != len(samples):
        raise ValueError(f"{len(chains)} skill chains for {len(samples)} samples")
    levels = taxonomy.levels
    chosen = np.zeros((len(levels), max(len(lv.skills) for lv in levels)), dtype=np.int64)  # (L, S)
    confusion = np.zeros((len(levels),) + (chosen.shape[1],) * 2, dtype=np.int64)  # (L, S, S)
    probs: list[list[float]] = [[] for _ in levels]
    labelled = matches = 0
    for chain, sample in zip(chains, samples, strict=True):
        picked = _chain_indices(chain, taxonomy)
        for i, choice in enumerate(chain.choices):
            chosen[i, picked[i]] += 1
            probs[i].append(choice.prob)
        label = _label_indices(sample, taxonomy, source)
        if label is None:
            continue
        labelled += 1
        matches += picked == label
        for i in range(len(levels)):
            confusion[i, label[i], picked[i]] += 1
    return RoutingStats(
        n=len(samples), n_labelled=labelled, chain_matches=matches,
        levels=[LevelRouting(
            level=level.name, skills=level.skills,
            chosen=chosen[i, :len(level.skills)].tolist(),
            labelled=confusion[i].sum(axis=1)[:len(level.skills)].tolist(),
            confusion=confusion[i, :len(level.skills), :len(level.skills)].tolist(),
            mean_prob=float(np.mean(probs[i])) if probs[i] else None,
        ) for i, level in enumerate(levels)],
    )


def _chain_indices(chain: SkillChain, taxonomy: Taxonomy) -> list[int]:
    names = [c.level for c in chain.choices]
    if names != list(taxonomy.level_names):
        raise ValueError(f"skill chain levels {names} are not the taxonomy's {list(taxonomy.level_names)}")
    return [level.index(c.skill) for level, c in zip(taxonomy.levels, chain.choices, strict=True)]


def _label_indices(sample: Sample, taxonomy: Taxonomy, source: str) -> list[int] | None:
    if sample.skills is None:
        return None
    try:
        return taxonomy.encode(sample.skills)
    except ValueError as error:
        raise DataError(source, sample.id, "skills", f"{error} (the model's taxonomy is "
                                                     f"{taxonomy.name!r})") from None


@dataclass
class Routes:
    """What the routers did on a list of samples, in their order."""

    chains: list[SkillChain]  # (N,) the chosen skill chains
    inputs: dict[int, torch.Tensor]  # MoSE layer → (N, H) float32, CPU: the pooled state its router read


def route_with_inputs(model: Any, processor: Any, samples: Sequence[Sample], *, batch_size: int = 8,
                      progress: bool = True, source: str = "samples",
                      description: str = "routing") -> Routes:
    """Each sample's skill chain as the model's own routers choose it (nothing forced), and the router inputs.

    Prompts are encoded as generation sees them (no answer), padded on the
    right; each forward stops once the last router has chosen
    (`model.routing_only()`). Padding and batch mates never change a route.
    """
    if not is_mose(model):
        raise AnalysisError(f"{type(model).__name__} is not a MoSE model: it has no skill chains to route")
    check_batch_size(batch_size)
    # No taxonomy, so no skill labels in the batch: given to the model, they would force the routes.
    encoder = SampleEncoder(processor, source=source)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad, padding_side="right")
    chains: list[SkillChain] = []
    inputs: dict[int, list[torch.Tensor]] = {}
    with eval_mode(model), torch.no_grad(), _progress(progress) as bar:
        task = bar.add_task(description, total=len(samples))
        for start in range(0, len(samples), batch_size):
            rows = samples[start:start + batch_size]
            batch = collate([encoder(s, with_answer=False) for s in rows])
            batch.pop("labels")  # all ignored: a prompt has no answer
            with model.routing_only():  # the routes are all we read
                model(**to_device(batch, model_device(model)), use_cache=False)
            chains += model.skill_chains()
            for layer, pooled in model.mose_state.router_inputs.items():
                inputs.setdefault(layer, []).append(pooled.float().cpu())  # (B, H)
            bar.advance(task, len(rows))
    return Routes(chains, {layer: torch.cat(parts) for layer, parts in sorted(inputs.items())})  # (N, H)


def route_samples(model: Any, processor: Any, samples: Sequence[Sample], *, batch_size: int = 8,
                  progress: bool = True, source: str = "samples",
                  description: str = "routing") -> list[SkillChain]:
    """Each sample's skill chain as the model's own routers choose it (`route_with_inputs`' chains)."""
    return route_with_inputs(model, processor, samples, batch_size=batch_size, progress=progress,
                             source=source, description=description).chains


def probe_by_layer(inputs: Mapping[int, torch.Tensor], labels: torch.Tensor,
                   level_of_layer: Mapping[int, int], taxonomy: Taxonomy) -> dict[int, float]:
    """Per MoSE layer: cross-validated accuracy of a linear probe for its level's skill.

    inputs: layer → (N, H) pooled router inputs of labelled samples; labels: (N, L)
    their skill index per level. Empty with fewer than MIN_PROBE_SAMPLES samples.
    """
    if len(labels) < MIN_PROBE_SAMPLES:
        return {}
    out = {}
    for layer, x in sorted(inputs.items()):
        level = level_of_layer[layer]
        out[layer] = cross_validated_accuracy(x, labels[:, level], len(taxonomy.levels[level].skills),
                                              folds=PROBE_FOLDS, seed=0)
    return out


def add_probes(stats: RoutingStats, routes: Routes, samples: Sequence[Sample],
               level_of_layer: Mapping[int, int], taxonomy: Taxonomy, source: str = "samples") -> None:
    """Fill each level's `probe_by_layer` from the router inputs of the labelled samples."""
    encoded = [_label_indices(s, taxonomy, source) for s in samples]
    keep = [i for i, label in enumerate(encoded) if label is not None]
    labels = torch.tensor([encoded[i] for i in keep], dtype=torch.long)  # (N, L)
    labels = labels.reshape(-1, len(taxonomy.levels))  # (N, L) even when N is 0
    probes = probe_by_layer({layer: x[keep] for layer, x in routes.inputs.items()}, labels,
                            level_of_layer, taxonomy)
    for i, level in enumerate(stats.levels):
        level.probe_by_layer = {layer: acc for layer, acc in probes.items() if level_of_layer[layer] == i}


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled)


@dataclass
class ModelAnalysis:
    """Everything analysed about one model."""

    name: str  # what the report calls it (its path)
    kind: str  # "mose" or "token_moe"
    similarity: list[LayerSimilarity]
    routing: RoutingStats | None = None  # MoSE models given labelled data
    chains: dict[str, SkillChain] = field(default_factory=dict)  # id → routed chain (not in JSON)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind,
                "similarity": [layer.to_dict() for layer in self.similarity],
                "routing": None if self.routing is None else self.routing.to_dict()}


def analyze_model(model: Any, processor: Any = None, samples: Sequence[Sample] | None = None, *,
                  name: str = "model", batch_size: int = 8, progress: bool = True,
                  source: str = "samples") -> ModelAnalysis:
    """Expert similarity, and for a MoSE model given samples, routing statistics and probe ceilings."""
    similarity = expert_similarity(model, name)
    result = ModelAnalysis(name, model_kind(model), similarity)
    if samples and is_mose(model):
        if processor is None:
            raise ValueError("routing statistics need the model's processor")
        routes = route_with_inputs(model, processor, samples, batch_size=batch_size, progress=progress,
                                   source=source, description=f"routing {name}")
        taxonomy = model.mose_config.taxonomy
        result.routing = routing_stats(routes.chains, samples, taxonomy, source)
        add_probes(result.routing, routes, samples, model.level_of_layer, taxonomy, source)
        result.chains = {s.id: c for s, c in zip(samples, routes.chains, strict=True)}
    return result


@dataclass(frozen=True)
class SampleView:
    """One sample as the report shows it."""

    id: str
    images: list[str]
    question: str
    choices: list[str] = field(default_factory=list)
    reference: str | None = None
    answer: str | None = None  # the prediction's answer
    verdict: str | None = None  # "correct"/"wrong", "exact match"/"differs"
    chain: str | None = None  # formatted skill chain
    chain_from: str | None = None  # "prediction" or "routers"
    label: str | None = None  # the labelled skills, formatted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_views(samples: Sequence[Sample], predictions: Mapping[str, Prediction] | None = None,
                 chains: Mapping[str, SkillChain] | None = None, limit: int = 8) -> list[SampleView]:
    """What the report shows of up to `limit` samples.

    With predictions: samples that have one, with its answer and skill chain.
    Without: the reference, and the chain the routers chose if `chains` has one.
    """
    if predictions is not None:
        samples = [s for s in samples if s.id in predictions]
    views = []
    for sample in samples[:limit]:
        prediction = predictions.get(sample.id) if predictions is not None else None
        chain = chains.get(sample.id) if chains else None
        if prediction is not None:
            chain_text, chain_from = format_chain(prediction.skill_chain), "prediction"
        elif chain is not None:
            chain_text, chain_from = format_chain(chain), "routers"
        else:
            chain_text, chain_from = None, None
        views.append(SampleView(
            id=sample.id, images=list(sample.images), question=sample.question,
            choices=list(sample.choices or []), reference=_reference(sample),
            answer=None if prediction is None else prediction.answer,
            verdict=None if prediction is None else _verdict(sample, prediction.answer),
            chain=chain_text, chain_from=chain_from,
            label=_label(sample),
        ))
    return views


def _label(sample: Sample) -> str | None:
    return None if sample.skills is None else " → ".join(f"{k}: {v}" for k, v in sample.skills.items())


def _reference(sample: Sample) -> str | None:
    if sample.choices and sample.correct is not None:
        return f"{LETTERS[sample.correct]}. {sample.choices[sample.correct]}"
    return sample.answer


def _verdict(sample: Sample, answer: str) -> str | None:
    """"correct"/"wrong" for multiple choice; "exact match"/"differs" for open answers."""
    if sample.choices and sample.correct is not None:
        return "correct" if parse_choice(answer, sample.choices) == sample.correct else "wrong"
    if sample.answer is None:
        return None
    return "exact match" if exact_match(answer, sample.answer) else "differs"

