"""convert(model, cfg): turn FFNs into MoSE or token-MoE blocks, in place (see `mose.inject`),
and make the model an instance of its converted class (`mose.modeling`), which saves and loads."""

from __future__ import annotations

from torch import nn

from mose.arch import arch_of
from mose.config import MoSEConfig, TokenMoEConfig
from mose.inject import AnyConfig, inject
from mose.modeling import mose_classes


def convert(model: nn.Module, cfg: AnyConfig) -> nn.Module:
    """Convert a supported transformers model in place and return it.

    The model becomes an instance of its MoSE subclass (same weights, new FFN
    blocks), whose forward accepts `skill_labels=` and whose `save_pretrained`
    output loads back with `mose.from_pretrained` or transformers' Auto classes.
    """
    if not isinstance(cfg, MoSEConfig | TokenMoEConfig):
        raise TypeError(f"cfg must be a MoSEConfig or TokenMoEConfig, got {type(cfg).__name__}")
    arch = arch_of(model)
    inject(model, arch, cfg)
    config_class, model_class = mose_classes(arch)
    model.config.__class__ = config_class  # same object, so submodules keep their references
    model.config.mose = cfg.to_dict()
    model.__class__ = model_class
    model.parse_mose_config()
    return model
