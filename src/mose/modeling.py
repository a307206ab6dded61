"""The converted models: per-architecture subclasses that route, save and load.

`convert` turns a model into the MoSE subclass of its class. The subclass
fills the routing state before each forward (padding, image tokens, skill
labels, cached decoding), attaches the router losses to the output, and
rebuilds its blocks from `config.mose` in `__init__`, so `save_pretrained` /
`from_pretrained` round-trip with no missing or unexpected keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers.utils import ModelOutput

from mose.arch import ARCHS, Arch
from mose.config import MoSEConfig, TokenMoEConfig, config_from_dict, resolve_layers
from mose.inject import inject
from mose.layers.blocks import expert_blocks
from mose.layers.losses import skill_routing_loss
from mose.models.checkpointing import RENAMED
from mose.routing import RoutingState, SkillChain, skill_chain_list, skill_label_tensor

PREFIX = "mose_"


class _RoutesDecided(Exception):
    """Raised once the last MoSE layer has routed, inside `routing_only`."""


class MoSEModelMixin:
    """What a converted model adds to its transformers class."""

    mose_state: RoutingState

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        inject(self, self.mose_arch, self.parse_mose_config())

    @property
    def mose_config(self) -> MoSEConfig | TokenMoEConfig:
        """The conversion config, parsed once from `config.mose` (which is what is saved)."""
        cached = self.__dict__.get("_mose_config_cache")
        if cached is None or cached[0] is not self.config.mose:
            return self.parse_mose_config()
        return cached[1]

    def parse_mose_config(self) -> MoSEConfig | TokenMoEConfig:
        """Parse `config.mose` now and cache it. Done wherever it is set (construction, `convert`,
        `set_decode_routing`), so that a compiled forward finds it cached: torch.compile cannot
        trace the dataclasses' parsing (a graph break per forward)."""
        cfg = config_from_dict(self.config.mose)
        self.__dict__["_mose_config_cache"] = (self.config.mose, cfg)
        return cfg

    def set_decode_routing(self, mode: str) -> None:
        """"once" (keep the prompt's route while generating) or "running"; saved with the model."""
        cfg = self.mose_config
        if not isinstance(cfg, MoSEConfig):
            raise TypeError("decode routing applies to MoSE models, not to the token-MoE baseline")
        self.config.mose = MoSEConfig.from_dict({**cfg.to_dict(), "decode_routing": mode}).to_dict()
        self.parse_mose_config()

    @property
    def level_of_layer(self) -> dict[int, int]:
        cfg = self.mose_config
        if not isinstance(cfg, MoSEConfig):
            raise TypeError("skill levels exist only in MoSE models, not in the token-MoE baseline")
        layers = resolve_layers(cfg.layers, len(self.mose_arch.layers(self)))
        return cfg.level_of_layers(layers)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *args: Any,
                skill_labels: Any = None, routing_mask: torch.Tensor | None = None, **kwargs: Any):
        """The base forward, plus `skill_labels` to force routes (and get `router_loss`).

        `routing_mask` (B, T) names the tokens the routers average over (default: every real
        token). Training passes the prompt's tokens: at inference the route is chosen on the
        prompt alone, so it must be in training too, and never read the answer.

        The output also carries `router_loss` (MoSE, when skill labels are given)
        and `aux_loss` (token MoE: the mean load-balancing loss, before its coefficient).
        """
        cfg = self.mose_config
        labels = self._skill_labels(skill_labels, cfg, input_ids, kwargs)
        past = kwargs.get("past_key_values")
        embeds = kwargs.get("inputs_embeds")
        seq_len = (input_ids if input_ids is not None else embeds).shape[1]
        self.mose_state.begin(
            seq_len=seq_len,
            attention_mask=attention_mask,
            routing_mask=routing_mask,
            image_mask=self._image_mask(input_ids) if getattr(cfg, "modality_groups", False) else None,
            skill_labels=labels,
            past_length=0 if past is None else past.get_seq_length(),
            decode_routing=getattr(cfg, "decode_routing", "once"),
        )
        output = super().forward(input_ids, attention_mask, *args, **kwargs)
        state = self.mose_state
        losses = {}
        if labels is not None and state.router_logits:
            losses["router_loss"] = skill_routing_loss(state.router_logits, self.level_of_layer, labels)
        if state.aux_losses:
            losses["aux_loss"] = torch.stack(list(state.aux_losses.values())).mean()
        return with_routing_losses(output, losses) if losses else output

    def _prefill(self, input_ids: torch.Tensor, generation_config, model_kwargs: dict,
                 *args: Any, **kwargs: Any):
        """generate's prefill, marked as a new prompt: routes are chosen on it (and on the
        filled cache it continues, if any) rather than kept from the previous call."""
        if generation_config.prefill_chunk_size is not None and isinstance(self.mose_config, MoSEConfig):
            raise ValueError(
                "MoSE routes a prompt on the mean hidden state of all its tokens before its FFNs run, "
                "which a chunk of it does not have: generate with prefill_chunk_size=None")
        self.mose_state.prefilling = True
        try:
            return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        finally:
            self.mose_state.prefilling = False

    def save_pretrained(self, save_directory, *args: Any, save_original_format: bool = False,
                        **kwargs: Any) -> None:
        """transformers' save, in the live module names by default.

        A model loaded from a checkpoint in the legacy key layout would otherwise
        be written back in that layout, which the converted class cannot map.
        """
        super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' load, then a LoRA block's base FFN frozen again: the loader replaces
        every weight with a new, trainable Parameter."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for block in expert_blocks(model):
            if block.base is not None:
                block.base.requires_grad_(False)
        return loaded

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                         *args: Any, **kwargs: Any) -> None:
        """transformers' activation checkpointing, refusing the reentrant kind.

        Routes are chosen in each decoder layer's pre-hook, outside the checkpointed
        forward, and a token MoE leaves its balance loss in the routing state: reentrant
        checkpointing runs the first forward without a graph and replays it in backward,
        so the route weights' graph would be walked twice (an error) and the balance loss
        would train nothing. The non-reentrant kind (transformers' default) has neither problem.
        """
        self._refuse_reentrant(activation_checkpointing_kwargs)
        super()._activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)

    if not RENAMED:  # transformers before the rename (5.19): the public name is the entry point
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                          *args: Any, **kwargs: Any) -> None:
            """As `_activation_checkpointing_enable`: the reentrant kind is refused."""
            self._refuse_reentrant(gradient_checkpointing_kwargs)
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, *args, **kwargs)

    def _refuse_reentrant(self, checkpoint_kwargs: dict | None) -> None:
        if (checkpoint_kwargs or {}).get("use_reentrant", False):
            raise ValueError(
                f"{type(self).__name__}: use_reentrant=True checkpointing cannot train routed blocks "
                "(routes are chosen outside the checkpointed forward); pass use_reentrant=False "
                "or leave the kwargs out")

    @contextmanager
    def routing_only(self) -> Iterator[None]:
        """Forwards inside the block stop as soon as the last MoSE layer has routed.

        For what needs routes and router inputs but no output (router
        pretraining, route-aware batching, routing statistics): neither the last
        MoSE layer nor anything after it runs, and the forward returns nothing.
        The stop is a pre-hook on that layer registered after its routing hook
        (hooks run in registration order), so its route is chosen first.
        """
        last = max(self.level_of_layer)

        def stop(*_args: Any) -> None:
            raise _RoutesDecided

        handle = self.mose_arch.layers(self)[last].register_forward_pre_hook(stop)
        try:
            yield
        except _RoutesDecided:
            pass
        finally:
            handle.remove()

    def skill_chains(self) -> list[SkillChain]:
        """Per sample of the last forward or generate: the skill chosen at each level."""
        return skill_chain_list(self.mose_state.routes, self.level_of_layer,
                                self.mose_config.taxonomy)

    def _skill_labels(self, skill_labels, cfg, input_ids, kwargs) -> torch.Tensor | None:
        if skill_labels is None:
            return None
        if not isinstance(cfg, MoSEConfig):
            raise ValueError("skill_labels apply to MoSE models, not to the token-MoE baseline")
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        return skill_label_tensor(skill_labels, cfg.taxonomy, reference.shape[0], reference.device)

    def _image_mask(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        ids = self.mose_arch.image_token_ids(self.config)
        if input_ids is None or not ids:
            return None
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))  # (B, T)


def with_routing_losses(output: ModelOutput, losses: dict[str, torch.Tensor]) -> ModelOutput:
    """`output` with the routing losses as fields of its class (`routing_output_class`)."""
    return routing_output_class(type(output))(**{**output, **losses})


_OUTPUT_CLASSES: dict[type[ModelOutput], type[ModelOutput]] = {}


def routing_output_class(base: type[ModelOutput]) -> type[ModelOutput]:
    """`base`, a transformers output dataclass, with `router_loss` and `aux_loss` fields.

    A key set on an output that its class lacks is lost wherever the output is rebuilt from
    its keys: DDP with find_unused_parameters flattens the forward's output and rebuilds it
    as `type(output)(**keys)`, which raised on `router_loss` at the first teacher-forced step.
    Made once per class, before any forward (`mose_classes`): making a class inside a compiled
    forward would break its graph.
    """
    if base not in _OUTPUT_CLASSES:
        fields = {"router_loss": torch.Tensor | None, "aux_loss": torch.Tensor | None}
        namespace = {"__annotations__": fields, **dict.fromkeys(fields), "__module__": __name__,
                     "__qualname__": f"MoSE{base.__name__}"}
        output_class = dataclasses.dataclass(type(f"MoSE{base.__name__}", (base,), namespace))
        globals()[output_class.__name__] = output_class  # importable by name, like any class
        _OUTPUT_CLASSES[base] = output_class
    return _OUTPUT_CLASSES[base]


def _returned_outputs(forward) -> list[type[ModelOutput]]:
    """The output classes a transformers forward says it returns."""
    returned = typing.get_type_hints(forward).get("return")
    options = typing.get_args(returned) or (returned,)
    return [o for o in options if isinstance(o, type) and issubclass(o, ModelOutput)]


@cache
def mose_classes(arch: Arch) -> tuple[type, type]:
    """The (config, model) subclasses for one architecture, made once."""
    base_model = arch.model_class
    base_config = base_model.config_class
    config_class = type(
        f"MoSE{base_config.__name__}",
        (base_config,),
        {"model_type": PREFIX + arch.name, "__annotations__": {"mose": dict | None},
         "mose": None, "__module__": __name__},
    )
    model_class = type(
        f"MoSE{base_model.__name__}",
        (MoSEModelMixin, base_model),
        {"config_class": config_class, "mose_arch": arch, "__module__": __name__,
         "forward": _forward_with_signature_of(base_model.forward),
         # Routers load as float32 whatever dtype the rest loads in (see `Router`).
         "_keep_in_fp32_modules_strict": ["router"]},
    )
    globals()[config_class.__name__] = config_class  # importable by name, like any class
    globals()[model_class.__name__] = model_class
    for output in _returned_outputs(base_model.forward):
        routing_output_class(output)
    return config_class, model_class


def _forward_with_signature_of(base_forward):
    """The mixin's forward, showing the base signature plus `skill_labels`.

    generate() checks its kwargs against the forward's signature, so the
    signature must name pixel_values and the rest, not just **kwargs.
    """

    def forward(self, *args: Any, **kwargs: Any):
        return MoSEModelMixin.forward(self, *args, **kwargs)

    signature = inspect.signature(base_forward)
    params = list(signature.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("skill_labels", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = signature.replace(parameters=params + var_keyword)
    forward.__doc__ = MoSEModelMixin.forward.__doc__
    return forward


def register_with_transformers() -> None:
    """Let transformers' Auto classes load saved MoSE models (done at `import mose`)."""
    from transformers import AutoConfig

    for arch in ARCHS.values():
        config_class, model_class = mose_classes(arch)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        arch.auto_class.register(config_class, model_class, exist_ok=True)


def from_pretrained(path: str | Path, **kwargs: Any):
    """Load a saved MoSE or token-MoE model; unlike transformers, any missing or
    unexpected weight is an error rather than a warning."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json (not a saved model directory)")
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    name = model_type.removeprefix(PREFIX)
    if not model_type.startswith(PREFIX) or name not in ARCHS:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not a converted mose model; "
            "load it with transformers and call mose.convert"
        )
    _, model_class = mose_classes(ARCHS[name])
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if problems:
        raise ValueError(f"{path}: weights do not match the model: {problems}")
    return model
