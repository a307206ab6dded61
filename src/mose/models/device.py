"""Where a model answers and in what precision: the one place that decides, for inference.

`mose predict`, `chat`, `analyze` and a study's evaluation all resolve `--device` and
`--dtype` here (`resolve_placement`), load through `mose.models.loading.load_for_inference`,
and send every batch they build to the model's device (`to_device(batch, model_device(model))`).
Training's device is Accelerate's business (`mose.train`), not this module's.

    auto device: cuda when torch sees a CUDA device, else cpu
    auto dtype:  bfloat16 on a CUDA device that supports it, else float32
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = (AUTO, *DTYPES)
DEVICE_CHOICES = (AUTO, "cpu", "cuda", "cuda:N", "mps")


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype: what a model is loaded in and moved to."""

    device: torch.device
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.device} {dtype_str(self.dtype)}"


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively on `device`: a CUDA device that supports them,
    or a CPU whose oneDNN has a bf16 path (AVX-512 and up). A CPU with AVX2 only emulates
    bf16, about 30-60x slower than float32 at 2B widths."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return True


def dtype_str(dtype: torch.dtype) -> str:
    """`bfloat16` for torch.bfloat16 (the names `--dtype` takes)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(spec: str | torch.device | None = AUTO, *, name: str = "device") -> torch.device:
    """The device `spec` names, checked to exist here; `auto` (or None) is cuda if there is one, else cpu.

    `name` is what errors call the setting (`--device` on the command line).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or AUTO).strip().lower()
    if spec == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name} {spec!r} is not a device mose runs on; choose one of "
                         f"{', '.join(DEVICE_CHOICES)}")
    if device.type == "cuda":
        _check_cuda(device, spec, name)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {spec!r}: this machine has no MPS device (Apple GPU); "
                         f"give {name} cpu, or {name} auto")
    return device


def _check_cuda(device: torch.device, spec: str, name: str) -> None:
    # A CPU-only torch build says the same as a machine without a GPU: say which it is.
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"{name} {spec!r}: CUDA is not available ({build}; torch {torch.__version__}); "
                         f"give {name} cpu, or {name} auto to use CUDA only where there is one")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{name} {spec!r}: there are {count} CUDA device(s) here, numbered from 0")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, *,
                  name: str = "dtype") -> torch.dtype:
    """The dtype `spec` names; `auto` (or None) is bfloat16 on a CUDA device that supports it, else
    float32 (a GPU without bfloat16 gets float32 rather than float16, which may overflow: ask for
    float16 explicitly)."""
    if isinstance(spec, torch.dtype):
        spec = dtype_str(spec)
    spec = (spec or AUTO).strip().lower()
    if spec == AUTO:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ValueError(f"{name} {spec!r} is not a dtype mose loads models in; choose one of "
                         f"{', '.join(DTYPE_CHOICES)}")
    return DTYPES[spec]


def resolve_placement(device: str | torch.device | None = AUTO, dtype: str | torch.dtype | None = AUTO, *,
                      device_name: str = "device", dtype_name: str = "dtype") -> Placement:
    """Device, then the dtype on it (`auto` depends on the device). Cheap: call it before any work."""
    resolved = resolve_device(device, name=device_name)
    return Placement(resolved, resolve_dtype(dtype, resolved, name=dtype_name))


def model_device(model: Any) -> torch.device:
    """Where a model takes its inputs: its `device` (transformers models: the first weight's, where
    the embeddings are), else its first parameter's, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of a model's floating weights are in (a few, like MoSE routers, stay float32)."""
    counts: Counter[torch.dtype] = Counter()
    for parameter in model.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a batch on `device` (ids, masks, pixel_values, image_grid_thw, skill_labels);
    anything else as it is. Dtypes are kept: the vision tower casts pixel_values to its own."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
