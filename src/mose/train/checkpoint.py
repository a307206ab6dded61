"""Checkpoints: complete model directories, and resume states inside a stage.

A stage's output directory is a complete model (safetensors weights, config,
tokenizer, image processor, the resolved recipe): `mose.from_pretrained(DIR)`
or `mose predict --model DIR` need nothing else. A resume state holds what the
stage changes (its trainable weights, the optimizer's moments, the scheduler,
the RNG and the step), in safetensors and JSON only: nothing is unpickled.
Both are written to a temporary name and renamed, so whatever exists is complete.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from mose.models.processor import save_processor

RECIPE_FILE = "recipe.yaml"
STEP_PREFIX = "step-"


def save_model(model: Any, processor: Any, out_dir: Path, recipe: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a complete model directory atomically (temp directory, then rename)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    save_processor(processor, tmp)
    (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def is_complete(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and (out_dir / RECIPE_FILE).is_file()


@dataclass
class ResumeState:
    step: int
    fingerprint: dict[str, Any]  # what the stage ran with: a resume must run with the same
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def save_resume(folder: Path, step: int, fingerprint: dict[str, Any], trainable: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Write the state after `step` optimizer steps, then drop older ones."""
    final = folder / f"{STEP_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{STEP_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    moments, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(moments, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"step": step, "fingerprint": fingerprint, "optimizer_groups": groups,
            "scheduler": scheduler_state, "python_rng": _jsonable(random.getstate())}
    (tmp / "state.json").write_text(json.dumps(meta))
    tmp.rename(final)
    for older in folder.glob(f"{STEP_PREFIX}*"):
        if older != final:
            shutil.rmtree(older)


def load_resume(folder: Path) -> ResumeState | None:
    """The newest complete resume state in `folder`, or None."""
    steps = sorted(folder.glob(f"{STEP_PREFIX}*")) if folder.is_dir() else []
    if not steps:
        return None
    latest = steps[-1]
    meta = json.loads((latest / "state.json").read_text())
    moments = load_file(latest / "optimizer.safetensors")
    optimizer = {"state": _unflatten_moments(moments), "param_groups": meta["optimizer_groups"]}
    python_rng = meta["python_rng"]
    rng = {"torch": load_file(latest / "rng.safetensors")["torch"],
           "python": (python_rng[0], tuple(python_rng[1]), python_rng[2])}
    return ResumeState(meta["step"], meta["fingerprint"], load_file(latest / "trainable.safetensors"),
                       optimizer, meta["scheduler"], rng)


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable weights into the model, refusing any mismatch."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(tensors) ^ set(params))
    wrong = [k for k in tensors if k in params and params[k].shape != tensors[k].shape]
    if missing or wrong:
        raise ValueError(f"{source}: the resume state does not match the model "
                         f"(weights not trained by both {missing[:3]}, wrong shapes {wrong[:3]})")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's {param index: {moment: tensor}} as flat safetensors keys `index.moment`."""
    moments = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            moments[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return moments, _jsonable(state["param_groups"])


def _unflatten_moments(moments: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
