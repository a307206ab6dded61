"""Real-shape checks: Qwen2-VL-2B's widths, random weights, bf16, every step mose takes.

`--dtype float32` runs them at the same widths in float32, for CPUs without native
bfloat16 (AVX2 only: a bf16 matmul at these widths is 30-60x slower than float32),
where the bf16 numerics are checked at tiny widths instead (`--quick`).

On a model of the published shape (`mose.models.shapes`; the tiny tokenizer for
inputs, the published vocabulary in the embedding), one after the other, each
timed and its peak memory measured:

- convert: `mose.convert` leaves the logits of the dense model (within bf16 tolerance);
- generate: route-once generation runs and keeps the prompt's routes;
- save_load: `save_pretrained` then `mose.from_pretrained` gives the same logits, bit for bit;
- router_step: one router-stage step (`fit_routers`: the pooling forward and one fit step);
- sft_step: one SFT optimizer step (`train_stage`) on the procedural driving world;
- activations: the bytes autograd saves for backward in one SFT micro-batch, against
  `mose.estimate`'s prediction for the same batch (the estimator's check: within 15 %);
- with `--stages N` (bench/gpu.sh on a GPU): an N-step router stage and an N-step SFT
  stage (bf16 mixed precision, fp32 weights as the recipes load them), each beside the
  per-GPU memory `mose estimate` predicts for it.

Memory: on the CPU, the process's peak resident set (VmHWM, reset before each check
through /proc/self/clear_refs; `resource.getrusage` maxrss, which cannot be reset, is
printed too); on CUDA, peak allocated. The script exits non-zero if a check fails.

    python real_shape.py --trim               # 2 decoder layers, 1 vision block (make test's form)
    python real_shape.py                      # 6 decoder layers, the full vision tower (CPU, ~10 GiB)
    python real_shape.py --device cuda --layers 28   # full depth on a GPU
    python real_shape.py --quick              # tiny widths: a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import run_checks
from PIL import Image

import mose
from mose.data import Sample, read_jsonl
from mose.data.collate import Collator, EncodedDataset, SampleEncoder
from mose.data.world import generate
from mose.estimate import MicroBatch, activation_bytes, estimate_stage, model_facts
from mose.models.shapes import get_shape, shape_model
from mose.train.loop import LoopContext, freeze_all_but, train_stage
from mose.train.recipe import RouterStage, SFTStage
from mose.train.router_fit import fit_routers
from mose.train.run import make_accelerator
from mose.train.stages import answer_objective, sft_plan

# With 2 decoder layers a MoSE model has at most 2 MoSE layers (one per level): the trimmed
# form keeps two of driving's levels, with two skills each (the world's other labels → general).
TRIM_TAXONOMY = {"name": "driving-trim", "levels": [
    {"name": "perception", "skills": ["general", "vehicle"]},
    {"name": "planning", "skills": ["general", "yield"]}]}
QUESTIONS = ["what is ahead?", "which object will cross the ego lane and what should the ego car do?"]
SIZES = [(112, 112), (56, 84)]  # 16 and 6 image tokens: the batch is padded
# Of the largest dense logit: 8 bf16 ulps (8 mantissa bits). The experts' batched products round
# differently from the dense nn.Linear, and one ulp of difference per layer carries up the stack
# (6 layers on the CPU: 0.039 at logits of 4.0, i.e. 2.5 ulps; 2 layers: exact).
BF16_TOLERANCE = 2 ** -5
FP32_TOLERANCE = 2 ** -16  # float32's 24 mantissa bits leave the same products far less to round


class Meter:
    """Wall time and peak memory of one check."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        self._reset()
        begin = time.perf_counter()
        detail = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        result = {"check": name, "seconds": round(seconds, 2), "peak_mib": round(self._peak(), 1),
                  "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  **detail}
        print(json.dumps(result), flush=True)
        return result

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def _peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_inputs(processor, device: torch.device) -> dict[str, torch.Tensor]:
    """Two chat prompts with an image each, left padded (as generation takes them)."""
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS]
    processor.tokenizer.padding_side = "left"
    images = [Image.new("RGB", size, color) for size, color in zip(SIZES, ("red", "blue"), strict=True)]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()  # (B, T, V)


def check_convert(model, inputs, cfg: mose.MoSEConfig) -> dict[str, Any]:
    dense = logits_of(model, inputs)
    mose.convert(model, cfg)
    logits = logits_of(model, inputs)
    error, scale = (logits - dense).abs().max().item(), dense.abs().max().item()
    tolerance = (BF16_TOLERANCE if model.dtype == torch.bfloat16 else FP32_TOLERANCE) * scale
    if not error <= tolerance:
        raise AssertionError(f"converted logits differ from the dense ones by {error:.4g} "
                             f"(tolerance {tolerance:.4g})")
    return {"max_abs_diff": error, "max_abs_logit": scale, "tolerance": tolerance}


def check_generate(model, inputs, new_tokens: int) -> dict[str, Any]:
    with torch.no_grad():
        model(**inputs)
        prompt_chains = [c.as_dict() for c in model.skill_chains()]
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    chains = [c.as_dict() for c in model.skill_chains()]
    if out.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise AssertionError(f"generate returned {out.shape[1]} tokens, expected prompt + {new_tokens}")
    if chains != prompt_chains:
        raise AssertionError(f"route once: generation's routes {chains} are not the prompt's {prompt_chains}")
    return {"new_tokens": new_tokens, "chains": len(chains)}


def check_save_load(model, inputs, folder: Path) -> dict[str, Any]:
    before = logits_of(model, inputs)
    model.save_pretrained(folder / "model")
    again = mose.from_pretrained(folder / "model", dtype=model.dtype).to(before.device)
    after = logits_of(again, inputs)
    if not torch.equal(before, after):
        raise AssertionError(f"reloaded logits differ by {(before - after).abs().max().item():.4g}")
    size = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors"))
    del again
    shutil.rmtree(folder / "model")
    return {"safetensors_mib": round(size / 2**20, 1)}


def world_dataset(processor, taxonomy, folder: Path, n: int) -> EncodedDataset:
    """Procedural driving samples with skill labels that `taxonomy` knows."""
    samples = list(read_jsonl(generate("driving", n=n, seed=0, out=folder / "world")))
    samples = [relabel(s, taxonomy) for s in samples]
    return EncodedDataset(samples, SampleEncoder(processor, taxonomy))


def relabel(sample: Sample, taxonomy) -> Sample:
    skills = {}
    for level in taxonomy.levels:
        skill = (sample.skills or {}).get(level.name, "general")
        skills[level.name] = skill if skill in level.skills else "general"
    sample.skills = skills
    return sample


def loop_context(processor, folder: Path, name: str) -> LoopContext:
    collator = Collator(processor.tokenizer.pad_token_id, padding_side="right")
    return LoopContext(make_accelerator("bf16" if torch.cuda.is_available() else "no"), collator, seed=0,
                       resume_dir=folder / "resume" / name, log_dir=folder / "logs" / name, progress=False)


def check_router_step(model, dataset: EncodedDataset, ctx: LoopContext, batch: int) -> dict[str, Any]:
    # Pooled in float32 and bf16 as shipped; a float32 run (no native bf16) keeps bf16 out of it.
    precisions = ["float32"] + (["bfloat16"] if model.dtype == torch.bfloat16 else [])
    stage = RouterStage(max_steps=1, batch_size=batch, log_every=1, save_every=0, patience=1,
                        precisions=precisions)
    half = len(dataset) // 2
    train, held = EncodedDataset.__new__(EncodedDataset), EncodedDataset.__new__(EncodedDataset)
    train.items, held.items = dataset.items[:half], dataset.items[half:]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    metrics = fit_routers(model, "router", stage, train, held, ctx)
    moved = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    if not moved:
        raise AssertionError("the router step changed no router weight")
    return {"loss": round(metrics["loss"], 4), "routers_moved": moved}


def check_sft_step(model, dataset: EncodedDataset, ctx: LoopContext, batch: int) -> dict[str, Any]:
    stage = SFTStage(max_steps=1, batch_size=batch, lr=1e-4, log_every=1, save_every=0, warmup_ratio=0.0)
    plan = sft_plan("sft", model, stage, dataset)
    name, weight = next((n, p) for n, p in model.named_parameters() if ".experts." in n)
    before = weight.detach().clone()
    train_stage(model, plan, ctx, resume=False)
    if torch.equal(before, weight.detach()):
        raise AssertionError(f"the SFT step left {name} unchanged")
    trainable = sum(p.numel() for m in plan.trainable for p in m.parameters())
    return {"loss": round(plan.metrics["loss"], 4), "trainable_params": trainable}


def check_activations(model, dataset: EncodedDataset, ctx: LoopContext, batch: int,
                      facts) -> dict[str, Any]:
    """Saved-for-backward bytes of one SFT micro-batch (no checkpointing) against the estimate."""
    plan = sft_plan("sft", model, SFTStage(batch_size=batch), dataset)
    freeze_all_but(model, plan.trainable, plan.frozen)
    model.train()
    items = dataset.items[:batch]
    collated = {k: v.to(model.device) for k, v in ctx.collator(items).items()}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # views share a storage: count it once
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    objective = answer_objective(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx.accelerator.autocast():
        loss = objective(model, collated)
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    shape = MicroBatch.of(collated, facts.merge)
    residual = next(model.parameters()).element_size()  # the residual stream is in the weights' dtype
    act = 2 if ctx.accelerator.mixed_precision == "bf16" else residual  # matmuls: autocast's, if any
    predicted = activation_bytes(facts, shape, act_bytes=act, residual_bytes=residual)
    measured = sum(seen.values())
    ratio = predicted.saved / measured
    if not 0.85 <= ratio <= 1.15:
        raise AssertionError(f"estimated saved activations {predicted.saved / 2**20:.1f} MiB are "
                             f"{ratio:.3f} × the measured {measured / 2**20:.1f} MiB (must be within 15 %)")
    return {"batch": shape.batch, "seq": shape.seq, "image_tokens": shape.image_tokens,
            "measured_mib": round(measured / 2**20, 1), "estimated_mib": round(predicted.saved / 2**20, 1),
            "estimate_over_measured": round(ratio, 3)}


def run_stage(model, stage, dataset: EncodedDataset, ctx: LoopContext, name: str) -> dict[str, Any]:
    """A whole stage as `mose train` runs it, with the estimator's prediction for its longest batch."""
    merge = model_facts(model).merge
    shape = max((MicroBatch.of(ctx.collator(dataset.items[i:i + stage.batch_size]), merge)
                 for i in range(0, len(dataset), stage.batch_size)), key=lambda m: m.seq)
    weight_bytes = next(model.parameters()).element_size()
    batch = MicroBatch(stage.batch_size, shape.seq, shape.image_tokens)
    predicted = estimate_stage(name, stage, model, batch, weight_bytes).gpus[0]  # DDP on one GPU
    if isinstance(stage, RouterStage):
        half = len(dataset) // 2
        train, held = EncodedDataset.__new__(EncodedDataset), EncodedDataset.__new__(EncodedDataset)
        train.items, held.items = dataset.items[:half], dataset.items[half:]
        metrics = fit_routers(model, name, stage, train, held, ctx)
    else:
        plan = sft_plan(name, model, stage, dataset)
        train_stage(model, plan, ctx, resume=False)
        metrics = plan.metrics
    return {"steps": stage.max_steps, "batch": stage.batch_size, "seq": shape.seq,
            "loss": round(metrics["loss"], 4), "predicted_mib": round(predicted.total / 2**20, 1),
            "predicted_activations_mib": round(predicted.activations / 2**20, 1)}


def stages(args, meter: Meter, device: torch.device, folder: Path) -> list[dict[str, Any]]:
    """N-step router and SFT stages on a fresh fp32 model (the recipes' weights), bf16 autocast."""
    model, processor, _ = build(args, device, dtype=torch.float32)
    layers = len(mose.arch.arch_of(model).layers(model))
    cfg = mose.MoSEConfig(taxonomy=TRIM_TAXONOMY, layers="all") if layers < 6 else mose.MoSEConfig()
    mose.convert(model, cfg)
    dataset = world_dataset(processor, cfg.taxonomy, folder, n=max(16, 4 * args.batch))
    common = dict(max_steps=args.stages, batch_size=args.batch, log_every=10, save_every=0)
    return [meter.measure("router_stage", lambda: run_stage(
                model, RouterStage(**common, patience=args.stages), dataset,
                loop_context(processor, folder, "router_stage"), "router_stage")),
            meter.measure("sft_stage", lambda: run_stage(
                model, SFTStage(**common, lr=1e-5, warmup_ratio=0.0), dataset,
                loop_context(processor, folder, "sft_stage"), "sft_stage"))]


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    if args.quick:  # tiny widths: checks the script, not the shape
        tiny, processor = mose.tiny_model("qwen2_vl", seed=0)
        # Built in `dtype` as the real shapes are (a cast fp32 model keeps bf16 rotary buffers that a
        # reload recomputes in fp32, so save/load would not be exact).
        with torch.device(device):
            model = type(tiny)._from_config(tiny.config, dtype=dtype).eval()
        return model, processor, "tiny:qwen2_vl"
    model, processor = shape_model(args.shape, layers=args.layers, vision_depth=args.vision_depth,
                                   device=device, dtype=dtype)
    return model, processor, get_shape(args.shape).hub_id


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="2b", help="2b (Qwen2-VL-2B-Instruct) or 3b (Qwen2.5-VL-3B-Instruct)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 6; --trim: 2)")
    p.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default all; --trim: 1)")
    p.add_argument("--trim", action="store_true", help="2 decoder layers, 1 vision block, 2 levels")
    p.add_argument("--quick", action="store_true", help="tiny widths (a smoke run of this script)")
    p.add_argument("--batch", type=int, default=2, help="samples per training micro-batch")
    p.add_argument("--stages", type=int, default=0, help="then N-step router and SFT stages (fp32 "
                   "weights, bf16 autocast on a GPU) beside the estimator's prediction")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="of the weights the checks build (float32: CPUs without native bf16)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    trimmed = args.trim or args.quick
    args.layers = args.layers or (2 if args.trim else 6)
    args.vision_depth = args.vision_depth or (1 if args.trim else None)
    device = torch.device(args.device)
    torch.manual_seed(0)
    meter = Meter(device)
    folder = Path(tempfile.mkdtemp(prefix="mose-real-shape-"))
    results: list[dict[str, Any]] = []
    try:
        built = {}
        dtype = getattr(torch, args.dtype)
        results.append(meter.measure("build", lambda: built.update(zip(
            ("model", "processor", "spec"), build(args, device, dtype), strict=True)) or {}))
        model, processor = built["model"], built["processor"]
        layers = len(mose.arch.arch_of(model).layers(model))
        cfg = mose.MoSEConfig(taxonomy=TRIM_TAXONOMY, layers="all") if trimmed and layers < 6 \
            else mose.MoSEConfig(taxonomy="driving")
        print(f"# Real-shape checks — {built['spec']}, {layers} decoder layers, "
              f"{len(model.model.visual.blocks)} vision blocks, taxonomy {cfg.taxonomy.name} "
              f"on layers {cfg.layers}; {device}, {args.dtype}; torch {torch.__version__}", flush=True)
        inputs = prompt_inputs(processor, device)
        results.append(meter.measure("convert", lambda: check_convert(model, inputs, cfg)))
        results.append(meter.measure("generate", lambda: check_generate(model, inputs, 4)))
        results.append(meter.measure("save_load", lambda: check_save_load(model, inputs, folder)))
        dataset = world_dataset(processor, cfg.taxonomy, folder, n=max(8, 4 * args.batch))
        ctx = loop_context(processor, folder, "router")
        results.append(meter.measure("router_step", lambda: check_router_step(model, dataset, ctx,
                                                                              args.batch)))
        facts = model_facts(model)
        results.append(meter.measure("activations", lambda: check_activations(model, dataset, ctx,
                                                                              args.batch, facts)))
        ctx = loop_context(processor, folder, "sft")
        results.append(meter.measure("sft_step", lambda: check_sft_step(model, dataset, ctx, args.batch)))
        if args.stages:
            del model, built, dataset, ctx
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results += stages(args, meter, device, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| check | s | peak MiB | what it found |\n|---|---|---|---|")
    for r in results:
        found = ", ".join(f"{k} {v}" for k, v in r.items()
                          if k not in ("check", "seconds", "peak_mib", "maxrss_mib"))
        print(f"| {r['check']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {found} |")


if __name__ == "__main__":
    run_checks(main)
