"""The shipped recipes as real runs run them, on 2 processes under the shipped launchers.

Every recipe of configs/coda-lm, configs/robo2vlm and configs/demo.yaml runs its own stage
sequence with its own options (teacher-forced SFT then refit, gradient checkpointing, the
token MoE's balance loss and trained routers, dense SFT of the even FFNs), shrunk by
`key=value` overrides to the tiny model, the procedural world and a few steps. Under
`accelerate launch` with configs/accelerate/ddp.yaml and fsdp.yaml, as `tests/launching.py`
adapts them to 2 CPU processes, each must match one process at the same global batch: the
same losses and router accuracies at every stage and the same final weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import cpu_config, finished, launch
from mose.data.world import generate
from mose.train.recipe import ConvertStage, RouterStage, load_recipe

ROOT = Path(__file__).parents[2]
SHIPPED = sorted(p.relative_to(ROOT / "configs").as_posix()
                 for family in ("coda-lm", "robo2vlm") for p in (ROOT / "configs" / family).glob("*.yaml")
                 if not p.name.startswith("_")) + ["demo.yaml"]
TRIM = bool(os.environ.get("MOSE_TRIM"))
# Trimmed, each launcher runs one benchmark's recipes (both see every stage sequence; moe-8x1 is
# moe-4x1's with more experts) and the demo's runs under FSDP, where a stage follows a sharded
# backbone stage; in full, every recipe under both.
LAUNCHED = {"ddp": [r for r in SHIPPED if not (TRIM and r.startswith(("robo2vlm/", "coda-lm/moe-8x1",
                                                                      "demo")))],
            "fsdp": [r for r in SHIPPED if not (TRIM and r.startswith(("coda-lm/", "robo2vlm/moe-8x1")))]}
DISTRIBUTED = {"ddp": "MULTI_CPU", "fsdp": "FSDP"}
RUNNER = ROOT / "tests" / "train_recipes.py"


def shrunk(recipe: str, out: Path, world: Path, processes: int) -> list[str]:
    """`mose train` arguments: the shipped recipe with overrides that shrink it, nothing else.

    Global batches do not depend on `processes` (per-process batch sizes are divided), and
    each stage keeps its shipped options (grad_accum, lr, teacher_forcing, checkpointing, ...)
    but the router stages' precisions.
    """
    path = ROOT / "configs" / recipe
    args = ["--config", str(path), "--no-progress", "model=tiny:qwen2_vl", f"output_dir={out}",
            f"data.train={world}"]
    for name, stage in load_recipe(path).stages.items():
        key = f"stages.{name}"
        if isinstance(stage, RouterStage):
            # Pooled in float32 only: a bf16 forward's rounding depends on the batch's shape, which
            # the number of processes changes (the bf16 pass itself: tests/unit/test_router_fit.py).
            args += [f"{key}.max_steps=20", f"{key}.eval_size=8", f"{key}.batch_size={8 // processes}",
                     f"{key}.precisions=[float32]"]
        elif not isinstance(stage, ConvertStage):
            args += [f"{key}.max_steps=2", f"{key}.batch_size={4 // processes}", f"{key}.log_every=1"]
    return args


def world_for(recipe: str, worlds: dict[str, Path]) -> Path:
    return worlds["robot" if recipe.startswith("robo2vlm/") else "driving"]


def run_name(recipe: str) -> str:
    return recipe.removesuffix(".yaml").replace("/", "--")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    """41 records: the router stages' 33 labelled ones split unevenly over 2 processes."""
    folder = tmp_path_factory.mktemp("worlds")
    return {domain: generate(domain, n=41, seed=1, out=folder / domain) for domain in ("driving", "robot")}


def one_process(worlds: dict[str, Path], folder: Path) -> None:
    """Every recipe in this process: the reference each launcher must match."""
    from typer.testing import CliRunner

    from mose.cli import app

    for recipe in sorted({r for recipes in LAUNCHED.values() for r in recipes}):
        result = CliRunner().invoke(app, ["train", *shrunk(recipe, folder / run_name(recipe),
                                                           world_for(recipe, worlds), 1)])
        assert result.exit_code == 0, (recipe, result.output[-3000:])


def launch_all(launcher: str, worlds: dict[str, Path], folder: Path):
    """Every recipe of LAUNCHED[launcher] in one `accelerate launch`, started."""
    jobs = [shrunk(r, folder / run_name(r), world_for(r, worlds), 2) for r in LAUNCHED[launcher]]
    (folder / "jobs.json").write_text(json.dumps(jobs))
    return launch(cpu_config(launcher, folder), str(RUNNER), str(folder / "jobs.json"))


@pytest.fixture(scope="module")
def runs(worlds, tmp_path_factory) -> dict[str, Path]:
    """"one" and each launcher → the folder of its runs, one after another (2 processes fill
    2 cores: run beside each other, they take longer than in turn)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("one", *LAUNCHED)}
    one_process(worlds, folders["one"])
    for launcher in LAUNCHED:
        finished(launch_all(launcher, worlds, folders[launcher]), timeout=900)
    return folders


def stage_results(run: Path) -> dict:
    return json.loads((run / "train_results.json").read_text())


def step_metrics(run: Path, stage: str) -> list[float]:
    """Loss, gradient norm, loss, gradient norm, ...: every step of a training stage."""
    rows = [json.loads(line) for line in (run / "logs" / stage / "metrics.jsonl").read_text().splitlines()]
    return [value for row in rows if "grad_norm" in row for value in (row["loss"], row["grad_norm"])]


def token_moe(recipe: str) -> bool:
    stages = load_recipe(ROOT / "configs" / recipe).stages.values()
    return any(getattr(stage, "token_moe", None) for stage in stages)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, recipe", [(lau, r) for lau, rs in LAUNCHED.items() for r in rs])
def test_a_shipped_recipe_on_two_processes_matches_one(launcher, recipe, runs):
    one, two = runs["one"] / run_name(recipe), runs[launcher] / run_name(recipe)
    expected, got = stage_results(one), stage_results(two)
    assert (got["world_size"], got["distributed"]) == (2, DISTRIBUTED[launcher])
    assert list(got["stages"]) == list(expected["stages"])
    for stage, metrics in expected["stages"].items():
        if "samples_per_s" in metrics:  # a training stage: every step's loss and gradient norm
            want, have = step_metrics(one, stage), step_metrics(two, stage)
            assert len(want) == len(have) > 0
            assert have == pytest.approx(want, rel=1e-4), stage
        else:  # convert, or a router stage (its held-out accuracies and the probe's)
            floats = {k: v for k, v in metrics.items() if isinstance(v, float)}
            assert {k: got["stages"][stage][k] for k in floats} == pytest.approx(floats, rel=1e-4), stage
    last = list(expected["stages"])[-1]
    want, have = load_file(one / last / "model.safetensors"), load_file(two / last / "model.safetensors")
    assert want.keys() == have.keys()
    for name, tensor in want.items():
        if token_moe(recipe) and ".router." in name:
            # The balance loss is per micro-batch (as Switch and transformers' MoE models have it),
            # so splitting the global batch moves the routers' near-zero gradients, whose Adam
            # steps are then +-lr: their gradients count in the per-step norms checked above.
            continue
        # Adam's first steps move every weight by about +-lr (2e-5 here) whatever its gradient's
        # size, so a weight whose gradient is ~0 may step either way on the two runs: a handful
        # of such elements are allowed, a missing or wrong update (most elements off) is not.
        off = ~torch.isclose(have[name], tensor, atol=1e-5, rtol=1e-4)
        assert off.sum() <= 1e-4 * off.numel(), f"{name}: {int(off.sum())} of {off.numel()} elements differ"
