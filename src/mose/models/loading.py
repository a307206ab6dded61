"""One way to get a model and its processor: `tiny:KIND`, a local directory, or a Hub id.

A directory is either a converted mose model (its `model_type` starts with
`mose_`, loaded strictly) or a dense checkpoint of a supported architecture,
exactly as a download looks. A Hub id is fetched by transformers; without
network access that is a clear error rather than a stack of retries.

Inference (`mose predict`, `chat`, `analyze`, a study's evaluation) loads through
`load_for_inference`: the model in the dtype and on the device `mose.models.device`
resolves (by default the GPU, in bfloat16 where it supports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mose.arch import ARCHS
from mose.models.device import Placement, resolve_placement
from mose.models.processor import load_processor
from mose.models.tiny import TINY_KINDS, tiny_model

TINY_PREFIX = "tiny:"
MOSE_PREFIX = "mose_"


def model_type_of(spec: str) -> str | None:
    """The `model_type` a local model spec will load as, or None for a Hub id.

    Cheap (reads config.json only), so recipes can be checked before any work.
    """
    if spec.startswith(TINY_PREFIX):
        kind = spec.removeprefix(TINY_PREFIX)
        if kind not in TINY_KINDS:
            raise ValueError(f"model {spec!r}: unknown tiny kind; choose tiny:{' or tiny:'.join(TINY_KINDS)}")
        return kind
    path = Path(spec)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model {spec!r}: {config_file} is missing (not a model directory)")
        model_type = json.loads(config_file.read_text()).get("model_type", "")
        base = model_type.removeprefix(MOSE_PREFIX)
        if base not in ARCHS:
            raise ValueError(f"model {spec!r}: model_type {model_type!r} is not supported; "
                             f"mose loads {', '.join(ARCHS)} (and their converted mose_ forms)")
        return model_type
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ValueError(f"model {spec!r}: no such directory (and not a Hub id of the form org/name)")
    return None


def is_converted(model_type: str | None) -> bool:
    return bool(model_type and model_type.startswith(MOSE_PREFIX))


def load_model(spec: str, seed: int = 0, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, processor) from `tiny:KIND`, a local directory or a Hub id, in eval mode."""
    model_type = model_type_of(spec)
    if spec.startswith(TINY_PREFIX):
        model, processor = tiny_model(spec.removeprefix(TINY_PREFIX), seed=seed)
        return (model.to(dtype) if dtype else model), processor
    kwargs = {"dtype": dtype} if dtype else {}
    if is_converted(model_type):
        from mose.modeling import from_pretrained

        model = from_pretrained(spec, **kwargs)
        return model.eval(), load_processor(spec)
    if model_type is not None:
        model = ARCHS[model_type].model_class.from_pretrained(spec, **kwargs)
        return model.eval(), load_processor(spec)
    return _from_hub(spec, kwargs)


def load_for_inference(spec: str, placement: Placement | None = None, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) as `load_model` gives them, in `placement`'s dtype, on its device, in eval mode.

    `placement` defaults to `resolve_placement()`: CUDA in bfloat16 where there is one, else the
    CPU in float32. Weights are loaded in the dtype (so a 2B model is never held in float32 on
    its way to a bfloat16 GPU) and then moved; MoSE routers keep the float32 the model class
    gives them, so nothing here casts them.
    """
    placement = placement or resolve_placement()
    model, processor = load_model(spec, seed=seed, dtype=placement.dtype)
    return model.to(placement.device).eval(), processor


def _from_hub(repo_id: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                          "tokenizer*"])
    except Exception as error:  # offline, unknown repo, no permission: all the same to the user
        raise ValueError(f"model {repo_id!r}: cannot fetch it from the Hugging Face Hub "
                         f"({type(error).__name__}: {error}); without network access, download it "
                         "elsewhere and give its local directory") from None
    return load_model(path, **({"dtype": kwargs["dtype"]} if kwargs else {}))
