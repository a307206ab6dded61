"""A shipped recipe as a GPU run runs it, shrunk: the 2B shape through router → sft → refit → predict.

configs/coda-lm/mose-lora.yaml (or --recipe) with `key=value` overrides only: the model is a
local checkpoint of Qwen2-VL-2B's shape with random weights (saved in bf16, as published),
the data the procedural driving world, a few steps per stage. Mixed precision is the
recipe's own `auto` (bf16 on a GPU that has it). Then the test split is answered three ways
and compared, with tolerances rather than equality where kernels differ by batch shape:

- chains, bf16 batches of 8 (route groups) against bf16 one question at a time;
- chains, bf16 against fp32 (the routers were fitted for both: the router stage's
  `precisions`);
- answers, batches of 8 against one at a time (a random model's near-tied logits make
  greedy tokens the most fragile thing compared here).

    python recipe_run.py --device cuda              # 8 layers at 2B widths, 30 SFT steps (bench/gpu.sh)
    python recipe_run.py --quick                    # tiny widths on the CPU: the path itself
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import run_checks

from mose.data import read_jsonl
from mose.data.world import generate
from mose.eval.predict import predict
from mose.models.loading import load_model
from mose.models.processor import save_processor
from mose.models.shapes import shape_model
from mose.models.tiny import tiny_model
from mose.train import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
# Agreement each comparison must reach (fractions of the test questions).
TOLERANCE = {"chains batch 8 vs 1": 0.90, "chains bf16 vs fp32": 0.90, "answers batch 8 vs 1": 0.50}


def checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    """A local model directory, as a download of the published checkpoint looks (bf16 weights)."""
    if args.quick:
        model, processor = tiny_model("qwen2_vl", seed=0)
    else:
        model, processor = shape_model("2b", layers=args.layers, dtype=torch.bfloat16)
    path = folder / "Qwen2-VL-2B-shape"
    model.save_pretrained(path)
    save_processor(processor, path)
    return path


def overrides(args: argparse.Namespace, model: Path, folder: Path, world: Path) -> list[str]:
    steps = args.steps
    return [f"model={model}", f"output_dir={folder / 'run'}", f"data.train={world}",
            f"stages.router.max_steps={4 * steps}", "stages.router.eval_size=16",
            f"stages.sft.max_steps={steps}", "stages.sft.grad_accum=1", "stages.sft.save_every=0",
            f"stages.refit.max_steps={4 * steps}", "stages.refit.eval_size=16"]


def answers(model_dir: Path, test: list, out: Path, device: str, dtype: torch.dtype,
            batch: int) -> list[dict]:
    model, processor = load_model(str(model_dir), dtype=dtype)
    model.to(device)
    predict(model, processor, test, out, batch_size=batch, max_new_tokens=8, progress=False)
    return [json.loads(line) for line in out.read_text().splitlines()]


def agreement(a: list[dict], b: list[dict], key: str) -> float:
    def value(row: dict):
        return row[key] if key == "answer" else {k: v["skill"] for k, v in row[key].items()}
    return sum(value(x) == value(y) for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", default=str(ROOT / "configs" / "coda-lm" / "mose-lora.yaml"))
    # Every stage writes a whole float32 checkpoint: 8 layers keep the four of them near 10 GB.
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 2B shape")
    p.add_argument("--steps", type=int, default=30, help="SFT steps (router stages: 4x)")
    p.add_argument("--quick", action="store_true", help="tiny widths: the path, not the shape")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 3)
    folder = Path(tempfile.mkdtemp(prefix="mose-recipe-run-"))
    begin = time.perf_counter()
    try:
        model = checkpoint(args, folder)
        world = generate("driving", n=48 if args.quick else 96, seed=0, out=folder / "world")
        test = list(read_jsonl(generate("driving", n=32, seed=0, out=folder / "world", split="test")))
        recipe = load_recipe(args.recipe, overrides(args, model, folder, world))
        stages = train(recipe, progress=False)
        trained = Path(stages[list(stages)[-1]]["output"])
        batched = answers(trained, test, folder / "b8.jsonl", args.device, torch.bfloat16, 8)
        alone = answers(trained, test, folder / "b1.jsonl", args.device, torch.bfloat16, 1)
        full = answers(trained, test, folder / "fp32.jsonl", args.device, torch.float32, 8)
        found = {"chains batch 8 vs 1": agreement(batched, alone, "skill_chain"),
                 "chains bf16 vs fp32": agreement(batched, full, "skill_chain"),
                 "answers batch 8 vs 1": agreement(batched, alone, "answer")}
        router = stages.get("refit", {})
        shape = "tiny widths" if args.quick else f"2B shape, {args.layers} layers"
        print(f"# {Path(args.recipe).name} on {args.device}, {shape}, {args.steps} SFT steps: "
              f"{time.perf_counter() - begin:.0f} s")
        print("| comparison | agreement | tolerance |\n|---|---|---|")
        for name, value in found.items():
            print(f"| {name} | {value:.3f} | {TOLERANCE[name]:.2f} |")
        print(f"refit held-out chains: {router.get('router_acc/chain', float('nan')):.3f} float32, "
              f"{router.get('router_acc/bfloat16/chain', float('nan')):.3f} bfloat16, "
              f"agree {router.get('router_acc/agree', float('nan')):.3f}")
        if args.json:
            args.json.write_text(json.dumps({**found, "stages": stages}, indent=2) + "\n")
        short = [name for name, value in found.items() if value < TOLERANCE[name]]
        if short:
            raise AssertionError(f"below tolerance: {', '.join(short)}")
        return found
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    run_checks(main)
