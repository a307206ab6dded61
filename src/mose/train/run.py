"""`mose train`: run a recipe's stages in order, each checkpointed and resumable.

Everything a recipe could get wrong (keys, types, stage order, data that is
missing, unlabelled or unanswered) is checked before the model is loaded.
Stage N's output directory is a complete model; a rerun with `resume=True`
skips finished stages and continues the unfinished one from its last resume
state, so an interrupted run ends with the weights an uninterrupted one has.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, set_seed
from rich.console import Console
from transformers.utils import logging as transformers_logging

from mose.arch import ARCHS
from mose.convert import convert
from mose.data import Sample
from mose.data.collate import Collator, EncodedDataset, SampleEncoder
from mose.data.schema import atomic_path
from mose.models.device import DTYPES
from mose.models.loading import is_converted, load_model, model_type_of
from mose.skills.taxonomy import Taxonomy
from mose.train.checkpoint import RECIPE_FILE, is_complete, save_model
from mose.train.data import EncodingCache, RecordCache, fraction_of, labelled_split
from mose.train.loop import SHARDED, LoopContext, train_stage
from mose.train.recipe import BackboneStage, ConvertStage, Recipe, RecipeError, RouterStage, SFTStage
from mose.train.router_fit import fit_routers
from mose.train.stages import backbone_plan, sft_plan

console = Console(stderr=True)
RESULTS_FILE = "train_results.json"


@dataclass
class StageData:
    train: list[Sample]
    held_out: list[Sample]  # router stage only
    source: str


def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          encodings: EncodingCache | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe; per stage, its output directory and last metrics.

    `encodings` keeps encoded samples for later calls (a study's runs share one);
    without it they are kept for this call's stages only.
    """
    data = check_recipe(recipe)
    transformers_logging.disable_progress_bar()  # our own bars say what is happening
    out = Path(recipe.output_dir)
    names = list(recipe.stages)
    done = [n for n in names if is_complete(out / n)]
    interrupted = sorted({p.parent.name for p in (out / ".resume").glob("*/step-*")})
    if (done or interrupted) and not resume:
        what = f"finished stage(s) {done}" if done else f"an interrupted stage {interrupted}"
        raise RecipeError(f"{out} already holds {what}: pass --resume to continue that run, "
                          "or choose another output_dir")
    first = next((i for i, n in enumerate(names) if n not in done), len(names))
    _check_finished_stages(recipe, out, names[:first])
    earlier = _earlier_results(out)
    results: dict[str, dict[str, Any]] = {
        n: {**earlier.get(n, {}), "output": str(out / n), "skipped": True} for n in names[:first]}
    if first == len(names):
        console.print(f"all stages of {recipe.source} are finished in {out}")
        return results
    accelerator = make_accelerator(recipe.mixed_precision)
    encodings = encodings if encodings is not None else EncodingCache()
    set_seed(recipe.seed)
    start_from = recipe.model if first == 0 else str(out / names[first - 1])
    model, processor = load_model(start_from, seed=recipe.seed, dtype=DTYPES[recipe.dtype])
    model.to(accelerator.device)
    if recipe.data.max_pixels:
        cap_image_pixels(processor, recipe.data.max_pixels)
    for name in names[first:]:
        set_seed(recipe.seed)  # a stage's randomness never depends on the stages before it
        stage = recipe.stages[name]
        metrics: dict[str, Any] = {}
        state_dict = None
        if isinstance(stage, ConvertStage):
            convert(model, stage.config())
        else:
            metrics, state_dict = _run_training(model, processor, recipe, name, stage, data[name],
                                                accelerator, resume, progress, encodings)
        if accelerator.is_main_process:
            save_model(model, processor, out / name, {**recipe.to_dict(), "finished_stage": name},
                       state_dict)
            shutil.rmtree(out / ".resume" / name, ignore_errors=True)
        accelerator.wait_for_everyone()
        if state_dict is not None and name != names[-1]:
            # The stage left the model sharded in place (FSDP2's DTensors, ZeRO-3's partitions
            # and the engines' hooks): the next stage starts from the whole weights it saved.
            del model
            model = load_model(str(out / name), seed=recipe.seed, dtype=DTYPES[recipe.dtype])[0]
            model.to(accelerator.device)
        results[name] = {"output": str(out / name), **metrics}
        if accelerator.is_main_process:
            console.print(f"[green]stage {name} done[/green] → {out / name} " +
                          " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    if accelerator.is_main_process:
        summary = {"world_size": accelerator.num_processes,
                   "distributed": accelerator.distributed_type.value, "stages": results}
        with atomic_path(out / RESULTS_FILE) as temp:
            temp.write_text(json.dumps(summary, indent=2) + "\n")
    return results


def _check_finished_stages(recipe: Recipe, out: Path, finished: list[str]) -> None:
    """A finished stage is reused only if it ran with what the recipe now says up to it."""
    current = recipe.to_dict()
    for i, name in enumerate(finished):
        saved = yaml.safe_load((out / name / RECIPE_FILE).read_text())
        changed = [k for k in ("model", "seed", "dtype", "data") if saved.get(k) != current[k]]
        changed += [f"stages.{n}" for n in finished[: i + 1]
                    if saved["stages"].get(n) != current["stages"][n]]
        if changed:
            raise RecipeError(f"{out / name} was trained with other settings ({', '.join(changed)}); "
                              "resume with the recipe it ran with, or choose another output_dir")


def _earlier_results(out: Path) -> dict[str, dict[str, Any]]:
    """What an earlier run of this output directory reported for its stages, kept on resume."""
    path = out / RESULTS_FILE
    return json.loads(path.read_text())["stages"] if path.is_file() else {}


def make_accelerator(mixed_precision: str) -> Accelerator:
    """One per process. `auto`: what `accelerate launch` says, else bf16 on a GPU that has it."""
    if mixed_precision == "auto":
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    # A step may leave trained weights unreached: the vision tower of a stage that trains it,
    # on a micro-batch without an image. DDP then reduces them as zeros rather than wait for
    # them (the cost: one walk of the autograd graph per step). Routing leaves none unreached:
    # a block's experts are one stacked weight, whose rows no sample chose get zeros.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # Without cpu=True, processes started by `accelerate launch` on a machine with no GPU
    # each run alone (DistributedType.NO) instead of joining one gloo group.
    on_cpu = not torch.cuda.is_available()
    if on_cpu and _launched_with("ACCELERATE_USE_DEEPSPEED"):
        # With cpu=True accelerate ignores DeepSpeed (plain data parallel); with cpu=False the
        # engine starts on the CPU but accelerate counts every process as rank 0 of 1.
        raise RecipeError("the accelerate config asks for DeepSpeed, which accelerate does not run "
                          "on a machine without a GPU (it would silently train something else); use "
                          "configs/accelerate/ddp.yaml or fsdp.yaml here")
    accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[ddp], cpu=on_cpu)
    if on_cpu and _launched_with("ACCELERATE_USE_FSDP"):
        fsdp_on_cpu(accelerator)
    return accelerator


def _launched_with(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() == "true"


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Run FSDP2 over gloo where there is no GPU, as accelerate runs it on GPUs.

    With cpu=True accelerate keeps DistributedType.MULTI_CPU whatever the launcher said, so
    an FSDP config would silently train plain data parallel. torch's FSDP2 itself runs on
    CPU tensors over gloo; only accelerate's device check stands in the way. Turning the
    state to FSDP (with the plugin the launcher's FSDP_* variables describe) makes every
    later call (prepare, clipping, the gathered state dict) take accelerate's FSDP2 path.
    """
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise RecipeError("the accelerate config asks for FSDP version 1, which runs on GPUs only; "
                          "set fsdp_config.fsdp_version: 2 to shard on CPU processes")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # As AcceleratorState does on GPUs: every later AcceleratorState() copies PartialState's.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def cap_image_pixels(processor: Any, max_pixels: int) -> None:
    """Images larger than `max_pixels` are resized down by the processor (aspect kept)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    shortest = min(image_processor.size["shortest_edge"], max_pixels)
    image_processor.size = {"shortest_edge": shortest, "longest_edge": max_pixels}


def _run_training(model, processor, recipe: Recipe, name: str, stage, data: StageData,
                  accelerator: Accelerator, resume: bool, progress: bool,
                  encodings: EncodingCache) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    if not isinstance(stage, RouterStage):  # the router stage pools on the whole model
        _check_images_under_sharding(data, accelerator, f"{recipe.source}: stage {name!r}")
    taxonomy = getattr(getattr(model, "mose_config", None), "taxonomy", None)
    encoder = SampleEncoder(processor, taxonomy, recipe.data.max_length, source=data.source)
    collator = Collator(getattr(processor, "tokenizer", processor).pad_token_id, padding_side="right")
    show = progress and accelerator.is_main_process
    with_answer = not isinstance(stage, RouterStage)
    dataset = EncodedDataset(data.train, encoder, with_answer, progress=show,
                             cache=encodings(data.source, encoder, with_answer))
    out = Path(recipe.output_dir)
    ctx = LoopContext(accelerator, collator, recipe.seed, resume_dir=out / ".resume" / name,
                      log_dir=out / "logs" / name, progress=progress)
    if isinstance(stage, RouterStage):
        held_out = EncodedDataset(data.held_out, encoder, with_answer=False)
        return fit_routers(model, name, stage, dataset, held_out, ctx), None
    plan = (backbone_plan if isinstance(stage, BackboneStage) else sft_plan)(name, model, stage, dataset)
    state_dict = train_stage(model, plan, ctx, resume)
    return plan.metrics, state_dict


def _check_images_under_sharding(data: StageData, accelerator: Accelerator, where: str) -> None:
    """Under FSDP or DeepSpeed every process runs the vision tower in a step or none does: a
    process whose micro-batch has no image skips it, and the others' collectives over its
    sharded weights (or their gradients) then wait for a partner that never comes (a hang, or
    gloo's collective mismatch)."""
    if accelerator.distributed_type not in SHARDED or accelerator.num_processes == 1:
        return
    without = [s for s in data.train if not s.images]
    if without and len(without) < len(data.train):
        raise RecipeError(
            f"{where}: {data.source} mixes records with images and {len(without)} without (the first: "
            f"{without[0].id}); under {accelerator.distributed_type.value} a micro-batch without an "
            "image skips the vision tower on its process while the others wait for it in the "
            "collectives over its sharded weights. Train the text-only records in a stage of their "
            "own, or launch with configs/accelerate/ddp.yaml")


def check_recipe(recipe: Recipe) -> dict[str, StageData]:
    """Validate the stage order and every stage's data against the model; the data per stage."""
    _check_weight_dtype(recipe)
    model_type = model_type_of(recipe.model)
    converted = is_converted(model_type)
    taxonomy = _saved_taxonomy(recipe.model) if converted else None
    mose_kind = converted and taxonomy is not None
    records = RecordCache()
    data: dict[str, StageData] = {}
    for name, stage in recipe.stages.items():
        where = f"{recipe.source}: stage {name!r}"
        if isinstance(stage, ConvertStage):
            if converted:
                raise RecipeError(f"{where}: the model is already converted; drop this stage or start "
                                  "from a dense model")
            cfg = stage.config()
            converted, taxonomy = True, getattr(cfg, "taxonomy", None)
            mose_kind = taxonomy is not None
            continue
        if isinstance(stage, BackboneStage) and converted:
            raise RecipeError(f"{where}: backbone trains the dense model; put it before the convert stage")
        # (the model is dense here; a Hub id's type is unknown until it loads)
        if isinstance(stage, BackboneStage) and stage.vision_lr is not None and model_type \
                and ARCHS[model_type].vision_path is None:
            raise RecipeError(f"{where}: vision_lr is set, but {model_type} has no vision tower")
        if isinstance(stage, RouterStage | SFTStage) and not converted:
            raise RecipeError(f"{where}: {stage.stage} needs a converted model; put a convert stage "
                              "before it (or start from a converted model directory)")
        if isinstance(stage, RouterStage) and not mose_kind:
            raise RecipeError(f"{where}: router pretraining needs a MoSE model, not the token-MoE baseline")
        data[name] = _stage_data(recipe, name, stage, records, taxonomy if mose_kind else None, where)
    return data


def _check_weight_dtype(recipe: Recipe) -> None:
    """Training stages keep float32 weights: AdamW applied to bf16 weights rounds most small
    updates away (at lr 2e-5, 20 steps moved only a fifth of them). Half precision belongs to
    the compute, through mixed precision, which keeps the float32 master weights."""
    training = [name for name, stage in recipe.stages.items() if not isinstance(stage, ConvertStage)]
    if recipe.dtype != "float32" and training:
        half = "fp16" if recipe.dtype == "float16" else "bf16"
        raise RecipeError(f"{recipe.source}: 'dtype' is {recipe.dtype}, but stage {training[0]!r} trains, "
                          f"and optimizer steps on {recipe.dtype} weights lose most updates; keep "
                          f"'dtype: float32' and set 'mixed_precision: {half}' to compute in {half}")


def _stage_data(recipe: Recipe, name: str, stage, records: RecordCache, taxonomy: Taxonomy | None,
                where: str) -> StageData:
    path = stage.data or recipe.data.train
    if path is None:
        raise RecipeError(f"{where}: no data; set data.train or stages.{name}.data")
    try:
        samples = records(path)
    except (FileNotFoundError, ValueError) as error:
        raise RecipeError(f"{where}: {error}") from None
    if isinstance(stage, RouterStage):
        held = records(recipe.data.eval) if recipe.data.eval else None
        train, held_out = labelled_split(samples, stage.labelled, stage.eval_size, recipe.seed, held)
        if not train:
            raise RecipeError(f"{where}: no record of {path} has skill labels; annotate it first "
                              "(mose annotate)")
        _check_skills(train + held_out, taxonomy, path, where)
        return StageData(train, held_out, path)
    train = fraction_of(samples, recipe.data.fraction, recipe.seed)
    missing = next((s for s in train if s.answer is None and s.correct is None), None)
    if missing is not None:
        raise RecipeError(f"{where}: {path}, record {missing.id}: no answer to train on")
    if isinstance(stage, SFTStage) and (stage.teacher_forcing or stage.skill_loss_weight):
        if taxonomy is None:
            raise RecipeError(f"{where}: teacher_forcing and skill_loss_weight need a MoSE model")
        unlabelled = next((s for s in train if s.skills is None), None)
        if unlabelled is not None:
            raise RecipeError(f"{where}: {path}, record {unlabelled.id}: teacher_forcing / "
                              "skill_loss_weight need skill labels on every record")
        _check_skills(train, taxonomy, path, where)
    return StageData(train, [], path)


def _check_skills(samples: list[Sample], taxonomy: Taxonomy, path: str, where: str) -> None:
    for sample in samples:
        try:
            taxonomy.encode(sample.skills)
        except ValueError as error:
            raise RecipeError(f"{where}: {path}, record {sample.id}, field 'skills': {error}") from None


def _saved_taxonomy(model_dir: str) -> Taxonomy | None:
    """The taxonomy of a converted model directory (None for the token-MoE baseline)."""
    from mose.config import config_from_dict

    cfg = config_from_dict(json.loads((Path(model_dir) / "config.json").read_text())["mose"])
    return getattr(cfg, "taxonomy", None)
