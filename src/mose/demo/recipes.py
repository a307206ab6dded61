"""The demo's recipes: one pretraining run, then three methods from its checkpoint.

Every method fine-tunes the same FFN positions (the even decoder layers) on the
same question-answer records with the same steps, batch, lr and schedule;
MoSE alone adds its router pretraining, which is part of the method (it trains
only the routers, on the labelled subset, and needs no backward through the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mose.demo.data import DemoData
from mose.demo.settings import DemoSettings
from mose.train import Recipe
from mose.train.recipe import recipe_from_dict

MODEL = "tiny:qwen2_vl"
METHODS = ("mose", "moe_4x1", "dense_sft")
LABELS = {"mose": "MoSE", "moe_4x1": "MoE 4×1 (token)", "dense_sft": "dense SFT"}
FINAL_STAGE = {"mose": "sft", "moe_4x1": "sft", "dense_sft": "sft"}


def pretrain_recipe(out: Path, data: DemoData, s: DemoSettings) -> Recipe:
    """The general model: every weight of the dense tiny model learns to describe scenes."""
    stage = {"stage": "backbone", "trainable": "all", "max_steps": s.pretrain_steps,
             "batch_size": s.batch_size, "lr": s.pretrain_lr, "save_every": 50}
    return _recipe(MODEL, out / "pretrain", data.pretrain, {"pretrain": stage}, s.seed)


def pretrained_model(out: Path) -> Path:
    return out / "pretrain" / "pretrain"


def method_recipe(method: str, out: Path, data: DemoData, s: DemoSettings) -> Recipe:
    budget = {"max_steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "save_every": 50}
    if method == "mose":
        stages = {"convert": {"mose": {"taxonomy": "driving"}},
                  "router": {"data": str(data.labelled), "max_steps": s.router_steps,
                             "batch_size": s.batch_size, "lr": s.router_lr, "eval_size": 0},
                  "sft": budget}
    elif method == "moe_4x1":
        stages = {"convert": {"token_moe": {"num_experts": 4, "top_k": 1}}, "sft": budget}
    elif method == "dense_sft":
        stages = {"sft": {"stage": "backbone", "trainable": "ffn", "layers": "even", **budget}}
    else:
        raise ValueError(f"unknown demo method {method!r}; choose one of {', '.join(METHODS)}")
    return _recipe(str(pretrained_model(out)), out / method, data.train, stages, s.seed)


def final_model(out: Path, method: str) -> Path:
    return out / method / FINAL_STAGE[method]


def _recipe(model: str, output_dir: Path, train: Path, stages: dict[str, Any], seed: int) -> Recipe:
    return recipe_from_dict({"model": model, "output_dir": str(output_dir), "seed": seed,
                             "data": {"train": str(train)}, "stages": stages},
                            source=f"mose demo ({output_dir.name})")
