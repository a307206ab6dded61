"""`mose predict --engine vllm`: mose routes, vLLM generates with each chain's adapter.

1. The routing pass (`model.routing_only()`: the forward stops after the last MoSE
   layer's router) gives every question its skill chain, in batches.
2. The chains' adapters come from `--export` (a `mose export` folder), or are exported
   for the chains the questions took into a temporary folder.
3. The MoSE model is freed, so the engine can have the device, and vLLM answers
   every question with its chain's adapter, prompts built as `mose predict` builds them.

The predictions file is `mose predict`'s own (`{id, answer, skill_chain}`), resumable
alike (`PredictionLog`).
"""

from __future__ import annotations

import gc
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mose.config import MoSEConfig
from mose.data.collate import SampleEncoder, load_images
from mose.data.schema import Sample
from mose.eval.analysis import route_samples
from mose.eval.batching import check_batch_size
from mose.eval.predict import GenerationOptions, PredictionLog, PredictReport, progress_bar
from mose.eval.predictions import Prediction, chain_dict
from mose.export import (
    ExportError,
    chain_adapter,
    chain_name,
    check_exportable,
    export_adapters,
    read_manifest,
)
from mose.models.device import Placement, dtype_str
from mose.models.loading import load_for_inference
from mose.routing import SkillChain
from mose.serving.engine import EnginePrompt, VLLMEngine, import_vllm

# Questions per engine call: vLLM batches inside a call, and each call's answers are
# appended to OUT.partial, so an interrupted run loses at most one call's work.
ENGINE_CHUNK = 256


def predict_with_vllm(model_spec: str, samples: Sequence[Sample], out_path: str | Path, *,
                      placement: Placement, export: str | Path | None = None, batch_size: int = 8,
                      options: GenerationOptions | None = None,
                      engine_overrides: Mapping[str, Any] | None = None,
                      progress: bool = True, source: str = "samples") -> PredictReport:
    """Answer every sample through vLLM (see the module docstring); resumable like `mose predict`.

    `placement`: where the routing pass runs, and the dtype both it and the engine use.
    `batch_size`: questions per routing batch. `engine_overrides`: more `vllm.LLM` arguments.
    """
    options = options or GenerationOptions()
    samples = list(samples)
    check_batch_size(batch_size)
    import_vllm()  # a missing engine is known before the model loads
    log = PredictionLog(out_path, samples, source)
    begin = time.perf_counter()
    if log.complete:
        return PredictReport(log.out_path, len(samples), 0, 0, 0, None, time.perf_counter() - begin)
    todo = log.todo(samples)
    with tempfile.TemporaryDirectory(prefix="mose-export-") as tmp:
        routed, folder, encoder = _route_and_export(model_spec, placement, todo, export, Path(tmp),
                                                    batch_size, progress, source)
        chains = [tuple(c.as_dict().values()) for c in routed]
        engine = VLLMEngine(folder, dtype=dtype_str(placement.dtype), overrides=engine_overrides,
                            max_images=max((len(s.images) for s in todo), default=1))
        with progress_bar(progress) as bar, log.open() as keep:
            task = bar.add_task("answering (vllm)", total=len(todo))
            for start in range(0, len(todo), ENGINE_CHUNK):
                rows = range(start, min(start + ENGINE_CHUNK, len(todo)))
                prompts = [EnginePrompt(encoder.chat_text(todo[i]), chain_name(chains[i]),
                                        load_images(todo[i], source)) for i in rows]
                tokens = engine.generate(prompts, options.vllm_kwargs())
                keep([Prediction(todo[i].id, encoder.tokenizer.decode(t, skip_special_tokens=True).strip(),
                                 chain_dict(routed[i])) for i, t in zip(rows, tokens, strict=True)])
                bar.advance(task, len(rows))
    return PredictReport(log.out_path, len(samples), len(todo), log.resumed,
                         -(-len(todo) // ENGINE_CHUNK), len(set(chains)), time.perf_counter() - begin)


def _route_and_export(model_spec: str, placement: Placement, samples: Sequence[Sample],
                      export: str | Path | None, tmp: Path, batch_size: int, progress: bool,
                      source: str) -> tuple[list[SkillChain], Path, SampleEncoder]:
    """Steps 1 and 2: each sample's chain, the export folder holding their adapters (the given one,
    checked, or `tmp`/export with exactly those chains), and the prompt encoder. The model is freed
    before returning: the engine needs the device's memory."""
    model, processor = load_for_inference(model_spec, placement)
    cfg = _check_servable(model, model_spec)
    routed = route_samples(model, processor, samples, batch_size=batch_size, progress=progress,
                           source=source)
    _warn_inexact([chain_adapter(cfg, c)[1] for c in routed])
    chains = {tuple(c.as_dict().values()) for c in routed}
    if export is None:
        folder = tmp / "export"
        export_adapters(model, folder, sorted(chains), processor=processor, progress=False)
    else:
        folder = Path(export)
        _check_export(folder, {chain_name(c) for c in chains})
    del model
    _free_device(placement)
    return routed, folder, SampleEncoder(processor, source=source)


def _check_servable(model: Any, model_spec: str) -> MoSEConfig:
    """The model's MoSE config if an engine can answer as it does, else an ExportError saying why."""
    try:
        cfg = check_exportable(model)
    except ExportError as error:
        raise ExportError(f"{model_spec}: {error}. Answer it with --engine torch") from None
    if cfg.decode_routing != "once":
        raise ExportError(f"{model_spec}: decode_routing is {cfg.decode_routing!r}: the route changes "
                          "while decoding, which one adapter per request cannot follow. Answer it "
                          "with --engine torch")
    return cfg


def _warn_inexact(exact: Sequence[bool]) -> None:
    inexact = sum(not e for e in exact)
    if inexact:
        warnings.warn(f"{inexact} of {len(exact)} questions routed inexactly (top-k > 1, or a level's "
                      "layers chose different skills): their chain's adapter approximates the MoSE "
                      "model there", stacklevel=3)


def _check_export(folder: Path, needed: set[str]) -> None:
    """An ExportError unless the export holds every adapter the questions need."""
    missing = sorted(needed - {c["name"] for c in read_manifest(folder)["chains"]})
    if missing:
        raise ExportError(f"{folder}: lacks the adapters of {len(missing)} chain(s) the questions take "
                          f"(first: {missing[0]}): export every chain, or leave out --export")


def _free_device(placement: Placement) -> None:
    gc.collect()
    if placement.device.type == "cuda":
        torch.cuda.empty_cache()
