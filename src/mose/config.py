"""MoSEConfig and TokenMoEConfig: validated dataclasses with a JSON round trip.

A config says what to build; whether it fits a given model (layer indices,
top-k against the skills of a level, architecture) is checked by `convert`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from mose.skills.taxonomy import load_taxonomy

LayerSpec = str | list[int]
DECODE_ROUTING = ("once", "running")
EXPERT_KINDS = ("full", "lora")
LORA_TARGETS = ("gate", "up", "down")  # the gated FFN's gate_proj, up_proj and down_proj


def _check_layers(layers: LayerSpec) -> LayerSpec:
    if isinstance(layers, str):
        if layers not in ("even", "odd", "all"):
            raise ValueError(f"layers must be 'even', 'odd', 'all' or a list of ints, got {layers!r}")
        return layers
    layers = list(layers)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeats an index: {layers}")
    return sorted(layers)


def resolve_layers(layers: LayerSpec, num_layers: int) -> list[int]:
    """The decoder layer indices a layer spec names, checked against the model's depth."""
    if layers == "even":
        return list(range(0, num_layers, 2))
    if layers == "odd":
        return list(range(1, num_layers, 2))
    if layers == "all":
        return list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer index {bad} out of range: the model has {num_layers} decoder layers")
    return list(layers)


def _check_expert_kind(cfg: MoSEConfig | TokenMoEConfig) -> None:
    """Validate and normalise `experts` and the LoRA fields (checked even when experts="full")."""
    if cfg.experts not in EXPERT_KINDS:
        raise ValueError(f"experts must be one of {EXPERT_KINDS}, got {cfg.experts!r}")
    if not isinstance(cfg.lora_rank, int) or isinstance(cfg.lora_rank, bool) or cfg.lora_rank < 1:
        raise ValueError(f"lora_rank must be a positive int, got {cfg.lora_rank!r}")
    alpha = cfg.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got {alpha!r}")
    cfg.lora_alpha = float(alpha)
    targets = [cfg.lora_targets] if isinstance(cfg.lora_targets, str) else list(cfg.lora_targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ValueError(
            f"lora_targets must be distinct names among {LORA_TARGETS}, got {cfg.lora_targets!r}")
    cfg.lora_targets = tuple(t for t in LORA_TARGETS if t in targets)  # canonical order


class _JSONConfig:
    """JSON round trip shared by both configs; `kind` tells them apart on disk."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"a {kind!r} config cannot load as {cls.__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        path = Path(text_or_path)
        text = path.read_text() if path.suffix == ".json" and path.is_file() else str(text_or_path)
        return cls.from_dict(json.loads(text))


@dataclass
class MoSEConfig(_JSONConfig):
    """What to build: skill experts per level on the chosen decoder layers.

    Args:
        taxonomy: a built-in name ("driving", "robot", "driving-question"), a YAML path, a dict or a
            Taxonomy; stored resolved, so a saved model carries its taxonomy.
        layers: which decoder layers' FFNs become MoSE blocks ("even", "odd",
            "all" or a list of indices). They are split into contiguous groups,
            one per level, as evenly as possible (earlier levels take the rest).
        top_k: skill experts used per sample at each MoSE layer.
        shared_expert: an always-on shared expert beside the skill experts.
        modality_groups: each skill owns an image expert and a text expert.
        decode_routing: "once" keeps the route chosen on the prompt for every
            generated token; "running" re-routes on the mean of all tokens so far.
        experts: "full" (upcycled copies of the FFN, the paper's) or "lora": the dense
            FFN stays (frozen) and a MoSE layer computes the FFN with weights
            W + ΔW_shared + ΔW_skill, low-rank deltas whose B starts at zero.
        lora_rank: rank r of every LoRA delta (experts="lora").
        lora_alpha: LoRA scaling numerator: a delta is (alpha / r) · B A.
        lora_targets: which of the FFN's projections get deltas ("gate", "up", "down").
    """

    kind: ClassVar[str] = "mose"

    taxonomy: Any = "driving"
    layers: LayerSpec = "even"
    top_k: int = 1
    shared_expert: bool = True
    modality_groups: bool = False
    decode_routing: str = "once"
    experts: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        _check_expert_kind(self)
        self.taxonomy = load_taxonomy(self.taxonomy)
        self.layers = _check_layers(self.layers)
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
        smallest = min(len(level.skills) for level in self.taxonomy.levels)
        if self.top_k > smallest:
            raise ValueError(
                f"top_k={self.top_k} is larger than the {smallest} skills of the smallest "
                f"level of taxonomy {self.taxonomy.name!r}"
            )
        if self.decode_routing not in DECODE_ROUTING:
            raise ValueError(f"decode_routing must be one of {DECODE_ROUTING}, got {self.decode_routing!r}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["taxonomy"] = self.taxonomy.to_dict()
        return data

    def level_of_layers(self, layer_indices: list[int]) -> dict[int, int]:
        """Map each MoSE layer to its level: contiguous, even groups, remainder first."""
        levels = len(self.taxonomy.levels)
        if len(layer_indices) < levels:
            raise ValueError(
                f"{len(layer_indices)} MoSE layer(s) {layer_indices} cannot cover the "
                f"{levels} levels of taxonomy {self.taxonomy.name!r}: choose more layers"
            )
        base, extra = divmod(len(layer_indices), levels)
        sizes = [base + (1 if i < extra else 0) for i in range(levels)]
        mapping, start = {}, 0
        for level, size in enumerate(sizes):
            for layer in layer_indices[start : start + size]:
                mapping[layer] = level
            start += size
        return mapping


@dataclass
class TokenMoEConfig(_JSONConfig):
    """The token-level top-k MoE baseline, upcycled on the same layers.

    Args:
        num_experts: routed experts per layer (copies of the FFN at conversion).
        top_k: experts per token.
        shared_expert: an always-on shared expert beside the routed ones.
        layers: as in MoSEConfig.
        aux_loss_coef: weight of the Switch load-balancing loss in training.
        router_init_std: routers start random, since identical upcycled experts
            with a zero router would never break symmetry.
        experts, lora_rank, lora_alpha, lora_targets: as in MoSEConfig; with
            experts="lora" each token's FFN is W + ΔW_shared + sum_k w_k ΔW_k over
            its top-k LoRA deltas.
    """

    kind: ClassVar[str] = "token_moe"

    num_experts: int = 4
    top_k: int = 1
    shared_expert: bool = False
    layers: LayerSpec = "even"
    aux_loss_coef: float = 0.01
    router_init_std: float = field(default=0.02)
    experts: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        _check_expert_kind(self)
        self.layers = _check_layers(self.layers)
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


def config_from_dict(data: dict[str, Any]) -> MoSEConfig | TokenMoEConfig:
    """Either config from its dict, chosen by its `kind`."""
    kinds = {cls.kind: cls for cls in (MoSEConfig, TokenMoEConfig)}
    kind = data.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown config kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind].from_dict(data)
