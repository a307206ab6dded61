"""Training recipes: YAML files with `key=value` overrides, checked before any work.

A recipe names a model, an output directory, the data and an ordered mapping
of stages; each stage's `stage:` (default: its name) is one of `backbone`,
`convert`, `router`, `sft`:

    model: tiny:qwen2_vl
    output_dir: runs/demo
    data: {train: runs/world/driving/train.jsonl}
    stages:
      convert: {mose: {taxonomy: driving}}
      router: {max_steps: 100, lr: 1.0e-3}
      sft: {epochs: 1, lr: 1.0e-4}

`base: other.yaml` (relative to the recipe) is read first and deep-merged
under the recipe; a key set to null there removes the base's (`router: null`
drops that stage). Overrides use dotted keys (`stages.sft.lr=3e-4`,
`data.fraction=0.5`, `stages.router=null`) and YAML values.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mose.config import MoSEConfig, TokenMoEConfig, config_from_dict
from mose.train.shipped import recipe_path

STAGE_KINDS = ("backbone", "convert", "router", "sft")


class RecipeError(ValueError):
    """A recipe that cannot run: names the file and the key."""


@dataclass
class DataOptions:
    train: str | None = field(default=None, metadata={"help":
        "Sample-record JSONL every training stage reads unless it names its own."})
    eval: str | None = field(default=None, metadata={"help":
        "Labelled held-out records for router accuracy (default: split off train)."})
    fraction: float = field(default=1.0, metadata={"help":
        "A seeded fraction of the answer data (backbone, sft): for data-size studies."})
    max_length: int | None = field(default=None, metadata={"help":
        "Tokens per sample; longer answers are cut."})
    max_pixels: int | None = field(default=None, metadata={"help":
        "Cap on an image's pixels (448*448 = 256 tokens); saved with the model."})

    def __post_init__(self) -> None:
        check_range(self, fraction=(0.0, 1.0, False), max_length=(1, None, True),
                     max_pixels=(1, None, True))


@dataclass
class TrainOptions:
    """What every training stage shares: optimisation, schedule, logging, checkpoints."""

    data: str | None = field(default=None, metadata={"help": "This stage's records instead of data.train."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the stage's data."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides epochs."})
    batch_size: int = field(default=8, metadata={"help": "Samples per process, per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    schedule: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help":
        "Learning-rate schedule after warm-up."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of the steps spent warming up."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help":
        "Gradient clipping norm (None: no clipping)."})
    grad_checkpointing: bool = field(default=False, metadata={"help":
        "Non-reentrant gradient checkpointing of the decoder layers."})
    log_every: int = field(default=10, metadata={"help":
        "Optimizer steps between log lines (TensorBoard, metrics.jsonl)."})
    save_every: int = field(default=100, metadata={"help":
        "Optimizer steps between resume states (0: none; each holds the trainable weights and their AdamW "
        "moments, so large trainable sets want it rarer)."})

    def __post_init__(self) -> None:
        check_range(self, epochs=(0.0, None, False), max_steps=(1, None, True),
                     batch_size=(1, None, True), grad_accum=(1, None, True), lr=(0.0, None, False),
                     weight_decay=(0.0, None, True), warmup_ratio=(0.0, 1.0, True),
                     max_grad_norm=(0.0, None, False), log_every=(1, None, True),
                     save_every=(0, None, True))


@dataclass
class BackboneStage(TrainOptions):
    """Plain fine-tuning of the dense model (the demo's pretraining; the dense-SFT baseline)."""

    stage: Literal["backbone"] = field(default="backbone", metadata={"help":
        "The stage kind (default: the stage's name)."})
    trainable: Literal["all", "language", "ffn"] = field(default="language", metadata={"help":
        "What trains: all, language (all but the vision tower) or ffn (the FFNs of layers: the dense-SFT "
        "baseline)."})
    layers: str | list[int] = field(default="even", metadata={"help":
        "Whose FFNs train with trainable=ffn (MoSE's layers by default)."})
    vision_lr: float | None = field(default=None, metadata={"help":
        "The vision tower's own peak lr with trainable=all (None: lr)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, vision_lr=(0.0, None, False))
        if self.vision_lr is not None and self.trainable != "all":
            raise RecipeError(f"vision_lr is {self.vision_lr} but trainable is {self.trainable!r}: "
                             "only trainable: all trains the vision tower")


@dataclass
class RouterStage(TrainOptions):
    """Router pretraining on skill labels, on the pooled inputs of one frozen forward
    (`mose.train.router_fit`): `epochs` / `max_steps` bound the fit, which keeps the epoch
    best on the held-out split and stops after `patience` epochs without a better one."""

    stage: Literal["router"] = field(default="router", metadata={"help":
        "The stage kind (default: the stage's name)."})
    epochs: float = field(default=200.0, metadata={"help":
        "Upper bound on the fit's epochs over the cached router inputs."})
    batch_size: int = field(default=16, metadata={"help": "Router inputs per step of the fit."})
    lr: float = field(default=1e-2, metadata={"help": "The routers' learning rate (AdamW)."})
    schedule: Literal["cosine", "linear", "constant"] = field(default="constant", metadata={"help":
        "Learning-rate schedule of the fit."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the steps spent warming up."})
    labelled: int | None = field(default=None, metadata={"help":
        "Skill-labelled samples to learn from (None: all there are)."})
    eval_size: int = field(default=200, metadata={"help":
        "Held out from the labelled pool when data.eval is not given."})
    patience: int = field(default=20, metadata={"help":
        "Epochs without a better held-out score before the fit stops."})
    precisions: list[Literal["float32", "bfloat16", "float16"]] = field(
        default_factory=lambda: ["float32", "bfloat16"], metadata={"help":
        "The dtypes the model will answer in. A bf16 forward moves the pooled inputs a router reads by about"
        " as much as one skill's inputs differ from another's, so the routers are fitted on the inputs of a "
        "forward in each (the weights held in it meanwhile) and scored in each."})
    consistency: float = field(default=10.0, metadata={"help":
        "Weight of the squared gap between a sample's router logits in the first precision and in the "
        "others: near a boundary, what decides a route must not be what the precision rounds."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, eval_size=(1, None, True), patience=(1, None, True),
                    consistency=(0.0, None, True))
        if not self.precisions or len(set(self.precisions)) != len(self.precisions):
            raise RecipeError(f"precisions is {self.precisions!r}; name each dtype once, at least one")


@dataclass
class SFTStage(TrainOptions):
    """Answer-only fine-tuning of the MoSE (or token-MoE) blocks; the rest frozen."""

    stage: Literal["sft"] = field(default="sft", metadata={"help":
        "The stage kind (default: the stage's name)."})
    skill_loss_weight: float = field(default=0.0, metadata={"help":
        "Keep the routers' skill loss as an auxiliary term, with this weight."})
    teacher_forcing: bool = field(default=False, metadata={"help":
        "Route by the samples' skill labels instead of the routers."})
    train_routers: bool | None = field(default=None, metadata={"help":
        "None: the token MoE's routers train, MoSE's only with skill_loss_weight (else they stay as the "
        "router stage fitted them)."})


@dataclass
class ConvertStage:
    stage: Literal["convert"] = field(default="convert", metadata={"help":
        "The stage kind (default: the stage's name)."})
    mose: dict | None = field(default=None, metadata={"help": "MoSEConfig fields: convert to MoSE."})
    token_moe: dict | None = field(default=None, metadata={"help":
        "TokenMoEConfig fields: convert to the token-MoE baseline."})

    def config(self) -> MoSEConfig | TokenMoEConfig:
        kind, fields_ = ("mose", self.mose) if self.mose is not None else ("token_moe", self.token_moe)
        return config_from_dict({"kind": kind, **fields_})


def check_range(options: Any, **bounds: tuple[float, float | None, bool]) -> None:
    """Each named option within (low, high); the flag says whether `low` itself is allowed."""
    for name, (low, high, low_ok) in bounds.items():
        value = getattr(options, name)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= low if low_ok else value > low)
        ok = ok and (high is None or value <= high)
        if not ok:
            above = f">= {low}" if low_ok else f"> {low}"
            within = f"{above} and <= {high}" if high is not None else above
            raise RecipeError(f"{name} is {value!r}; it must be {within}")


StageOptions = BackboneStage | ConvertStage | RouterStage | SFTStage
STAGE_CLASSES: dict[str, type] = {"backbone": BackboneStage, "convert": ConvertStage,
                                  "router": RouterStage, "sft": SFTStage}


@dataclass
class Recipe:
    model: str = field(metadata={"help": "tiny:KIND, a local directory (dense or converted) or a Hub id."})
    output_dir: str = field(metadata={"help":
        "Every stage writes a complete model directory OUTPUT_DIR/STAGE/."})
    stages: dict[str, StageOptions] = field(metadata={"help":
        "The stages, in order: name → options (see the stage tables)."})
    data: DataOptions = field(default_factory=DataOptions, metadata={"help": "Data options (see below)."})
    seed: int = field(default=0, metadata={"help": "Seed of batch order, initialisation and data subsets."})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help":
        "auto: bf16 where the GPU has it."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help":
        "Weights as loaded; training stages need float32 (mixed_precision computes in half precision)."})
    source: str = field(default="<recipe>", metadata={"help":
        "The file it came from, for error messages (not a key)."})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data

    def stage_output(self, name: str) -> Path:
        return Path(self.output_dir) / name


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge `base:`, apply `key=value` overrides, and validate. `path` may also name a
    shipped recipe (`coda-lm/mose`), so an installed mose runs them without the repository."""
    try:
        path = recipe_path(path)
    except ValueError as error:  # neither a file nor a shipped name: a RecipeError, as a missing file was
        raise RecipeError(str(error)) from None
    data = read_with_base(path, seen=())
    for item in overrides:
        apply_override(data, item, path)
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    stages = data.pop("stages", None)
    if not isinstance(stages, dict) or not stages:
        raise RecipeError(f"{source}: key 'stages' must be a non-empty mapping of stage name → options")
    data["stages"] = {name: _stage(name, options, source) for name, options in stages.items()
                      if options is not None}  # a stage set to null is dropped
    data["data"] = data.get("data") or {}
    return build_options(Recipe, {**data, "source": source}, source, "")


def _stage(name: str, options: Any, source: str) -> StageOptions:
    options = dict(options or {})
    kind = options.setdefault("stage", name)
    if kind not in STAGE_CLASSES:
        raise RecipeError(f"{source}: stages.{name}.stage is {kind!r}; "
                          f"choose one of {', '.join(STAGE_KINDS)}")
    stage = build_options(STAGE_CLASSES[kind], options, source, f"stages.{name}")
    if isinstance(stage, ConvertStage):
        if (stage.mose is None) == (stage.token_moe is None):
            raise RecipeError(f"{source}: stages.{name} needs exactly one of 'mose' or 'token_moe'")
        try:
            stage.config()
        except (TypeError, ValueError) as error:
            raise RecipeError(f"{source}: stages.{name}: {error}") from None
    return stage


def build_options(cls: type, data: Any, source: str, where: str) -> Any:
    """A dataclass from a mapping, every key and type checked, naming the key on error.

    Fields typed as another dataclass are built from their own mapping the same way.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'recipe'} must be a mapping, got {data!r}")
    data = dict(data)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{source}: unknown key {_key(where, unknown[0])}; "
                          f"known: {', '.join(n for n in known if n != 'source')}")
    hints = typing.get_type_hints(cls)
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecipeError(f"{source}: missing required key {_key(where, name)}")
            continue
        data[name] = _check_type(data[name], hints[name], source, f"{where}.{name}" if where else name)
    try:
        return cls(**data)
    except RecipeError as error:  # a value out of range: name the file and the full key
        raise RecipeError(f"{source}: {where + '.' if where else ''}{error}") from None


def _check_type(value: Any, hint: Any, source: str, key: str) -> Any:
    """The value, if it fits the annotation (ints are accepted as floats); `key` is its dotted path."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise RecipeError(f"{source}: '{key}' is {value!r}; choose one of "
                              f"{', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if value is not None and len(options) == 1:  # X | None: X's own, more precise, error
            return _check_type(value, options[0], source, key)
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, source, key)
            except RecipeError:
                continue
        raise RecipeError(f"{source}: '{key}' is {value!r}, of the wrong type (expected {_name(hint)})")
    expected = origin or hint
    if is_dataclass(expected):
        return build_options(expected, value, source, key)
    if expected is type(None):
        ok = value is None
    elif expected is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string: take it as the number it means.
        ok = (isinstance(value, int | float) and not isinstance(value, bool)) or _is_float(value)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:  # list[T], checked item by item
        (item,) = typing.get_args(hint) or (int,)  # a bare `list`: layer indices
        ok = isinstance(value, list)
        value = [_check_type(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)] if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise RecipeError(f"{source}: '{key}' is {value!r}, of the wrong type (expected {_name(hint)})")
    return value


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _key(where: str, name: str) -> str:
    return f"'{where}.{name}'" if where else f"'{name}'"


def read_with_base(path: Path, seen: tuple[Path, ...] = (), what: str = "recipe") -> dict[str, Any]:
    """A YAML mapping with its `base:` file (relative to it) merged under it, recursively."""
    if not path.is_file():
        raise RecipeError(f"{path}: no such {what} file")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: 'base' includes form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a mapping of keys")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(read_with_base(path.parent / base, seen + (path.resolve(),), what), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if value is None:
            merged.pop(key, None)
            continue
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_maps else value
    return merged


def apply_override(data: dict[str, Any], item: str, path: Path) -> None:
    """Set a dotted `key=value` in place, the value read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r}: expected KEY=VALUE (e.g. stages.sft.lr=1e-4)")
    value = yaml.safe_load(text) if text else None
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(parents[: i + 1])} in {path} is not a mapping")
        node = child
    node[last] = value


def _is_float(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True
