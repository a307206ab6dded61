"""Checkpoints: complete model directories, and resume states inside a stage.

A stage's output directory is a complete model (safetensors weights, config,
tokenizer, image processor, the resolved recipe): `mose.from_pretrained(DIR)`
or `mose predict --model DIR` need nothing else. A resume state holds what the
stage changes (its trainable weights, the optimizer's moments, the scheduler,
the RNG and the step), in safetensors and JSON only: nothing is unpickled.
A sharded (FSDP2) stage's state has one part per process, `rank-R/`, holding that
process's shards of the trainable tensors and their moments: it resumes on the
same number of processes only, which the state's fingerprint makes sure of.
Both are written to a temporary name and renamed, so whatever exists is complete.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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
    with own_class(model):
        model.save_pretrained(tmp, state_dict=state_dict)
    save_processor(processor, tmp)
    (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


@contextmanager
def own_class(model: torch.nn.Module) -> Iterator[None]:
    """The model as its own class while inside: FSDP2's `fully_shard` swaps a model's class for
    `FSDP<Class>`, and transformers finds a class's checkpoint key layout by its name, so a
    sharded stage's dense model would be saved in another layout than the same stage on one process."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = sharded_class


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
    """Write the state after `step` optimizer steps, then drop older ones (one writer)."""
    tmp = begin_resume(folder, step)
    state = optimizer.state_dict()
    write_resume_part(tmp, trainable, state["state"])
    finish_resume(folder, step, fingerprint, state["param_groups"], scheduler)


def temp_folder(folder: Path, step: int) -> Path:
    """Where the state after `step` is written before it is complete."""
    return folder / f".tmp-{STEP_PREFIX}{step:08d}"


def begin_resume(folder: Path, step: int) -> Path:
    """A fresh temporary folder for the state after `step`, to write the parts into."""
    tmp = temp_folder(folder, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_resume_part(folder: Path, trainable: dict[str, torch.Tensor],
                      moments: dict[int, dict[str, torch.Tensor]], part: str | None = None) -> None:
    """One process's share of a state: its trainable tensors, their optimizer moments (AdamW's
    {param index: {name: tensor}}) and its torch RNG, in `folder/part` (`folder` itself without a part).

    A sharded stage writes one part per process, each holding the local shards of its tensors.
    """
    where = folder / part if part else folder
    where.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    save_file(tensors, where / "trainable.safetensors")
    save_file(_flatten_moments(moments), where / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, where / "rng.safetensors")


def finish_resume(folder: Path, step: int, fingerprint: dict[str, Any], optimizer_groups: list[dict],
                  scheduler: Any, parts: int = 0) -> None:
    """Complete the temporary folder of `step` (its parts all written) and rename it into place."""
    tmp, final = temp_folder(folder, step), folder / f"{STEP_PREFIX}{step:08d}"
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"step": step, "fingerprint": fingerprint, "optimizer_groups": _jsonable(optimizer_groups),
            "scheduler": scheduler_state, "python_rng": _jsonable(random.getstate()), "parts": parts}
    (tmp / "state.json").write_text(json.dumps(meta))
    tmp.rename(final)
    for older in folder.glob(f"{STEP_PREFIX}*"):
        if older != final:
            shutil.rmtree(older)


def load_resume(folder: Path, part: str | None = None) -> ResumeState | None:
    """The newest complete resume state in `folder` (this process's `part` of it), or None."""
    steps = sorted(folder.glob(f"{STEP_PREFIX}*")) if folder.is_dir() else []
    if not steps:
        return None
    latest = steps[-1]
    meta = json.loads((latest / "state.json").read_text())
    where = latest / part if part else latest
    if not (where / "trainable.safetensors").is_file():
        # Another layout (a sharded stage's parts, or one whole state): the fingerprint says why.
        return ResumeState(meta["step"], meta["fingerprint"], {}, {}, meta["scheduler"], {})
    moments = load_file(where / "optimizer.safetensors")
    optimizer = {"state": _unflatten_moments(moments), "param_groups": meta["optimizer_groups"]}
    python_rng = meta["python_rng"]
    rng = {"torch": load_file(where / "rng.safetensors")["torch"],
           "python": (python_rng[0], tuple(python_rng[1]), python_rng[2])}
    return ResumeState(meta["step"], meta["fingerprint"], load_file(where / "trainable.safetensors"),
                       optimizer, meta["scheduler"], rng)


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable weights into the model, refusing any mismatch."""
    copy_tensors({name: p for name, p in model.named_parameters() if p.requires_grad}, tensors, source)


def copy_tensors(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved tensors into `targets` (parameters, or the local shards of sharded ones) by name."""
    missing = sorted(set(tensors) ^ set(targets))
    wrong = [k for k in tensors if k in targets and targets[k].shape != tensors[k].shape]
    if missing or wrong:
        raise ValueError(f"{source}: the resume state does not match the model "
                         f"(weights not trained by both {missing[:3]}, wrong shapes {wrong[:3]})")
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def _flatten_moments(state: dict[int, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """AdamW's {param index: {moment: tensor}} as flat safetensors keys `index.moment`."""
    moments = {}
    for index, per_param in state.items():
        for key, value in per_param.items():
            moments[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return moments


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
