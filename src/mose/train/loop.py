"""The training loop every stage shares, on Hugging Face Accelerate.

A stage hands the loop its trainable modules, its dataset and an objective
that returns the loss summed over the micro-batch's items. The
loop divides by the number of items in the whole optimizer step across all
processes, so gradient accumulation and data parallelism give the gradient of
one big batch: one process with batch 4 equals two with batch 2.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from mose.data.collate import Collator
from mose.layers import Router
from mose.models.checkpointing import disable_checkpointing, enable_checkpointing
from mose.train.checkpoint import (
    begin_resume,
    copy_tensors,
    finish_resume,
    load_resume,
    restore_rng,
    temp_folder,
    write_resume_part,
)
from mose.train.data import BatchOrder
from mose.train.precision import held_in, weights
from mose.train.recipe import TrainOptions

# (the model as prepared by Accelerate, a batch) → the loss summed over the batch's items
Objective = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class StagePlan:
    """One training stage as the loop sees it."""

    name: str
    options: TrainOptions
    dataset: torch.utils.data.Dataset
    trainable: list[nn.Module]  # modules whose parameters train; everything else is frozen
    objective: Objective
    frozen: list[nn.Module] = field(default_factory=list)  # parts of those that stay frozen
    # parts of those that train at their own peak lr (the schedule scales it as it scales options.lr)
    own_lr: list[tuple[nn.Module, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # filled by the loop: the last logged values


@dataclass
class LoopContext:
    accelerator: Accelerator
    collator: Collator
    seed: int
    resume_dir: Path  # resume states of this stage
    log_dir: Path  # TensorBoard events and metrics.jsonl
    progress: bool = True


def freeze_all_but(model: nn.Module, trainable: list[nn.Module],
                   frozen: list[nn.Module] = ()) -> list[tuple[str, nn.Parameter]]:
    """Freeze the model except `trainable` (less `frozen`); the trainable (name, parameter) pairs."""
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    for module in frozen:
        module.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the stage has nothing to train")
    return named


SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def train_stage(model: nn.Module, plan: StagePlan, ctx: LoopContext,
                resume: bool) -> dict[str, torch.Tensor] | None:
    """Run one stage's optimizer steps on `model` in place, resumable from ctx.resume_dir.

    Returns the full state dict gathered from the shards under FSDP or DeepSpeed
    (the model's own parameters are then partitioned), else None.
    """
    acc, opts = ctx.accelerator, plan.options
    if acc.distributed_type == DistributedType.DEEPSPEED and opts.grad_accum > 1:
        # The DeepSpeed engine steps at every backward unless it accumulates itself.
        raise ValueError(f"stage {plan.name!r}: under DeepSpeed set grad_accum 1 and raise "
                         "batch_size (or the number of processes) instead")
    freeze_all_but(model, plan.trainable, plan.frozen)
    with frozen_in_compute_dtype(model, acc):
        runner = _train(model, plan, ctx, resume)
    state_dict = acc.get_state_dict(runner) if acc.distributed_type in SHARDED else None
    acc.free_memory()  # drop accelerate's references to this stage's model and optimizer
    return state_dict


def frozen_in_compute_dtype(model: nn.Module, acc: Accelerator):
    """Under bf16 mixed precision, the stage's frozen weights held in bf16 (`mose.train.precision`)
    while it runs. Not where the engine partitions weights (FSDP2, whose units need one dtype and
    whose policy gathers weights in bf16 already; ZeRO-3), nor under fp16, whose range a residual
    stream held in it could overflow."""
    if acc.mixed_precision != "bf16" or partitions_weights(acc):
        return nullcontext()
    return held_in(weights(model, frozen_only=True), torch.bfloat16)


def partitions_weights(acc: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return acc.state.deepspeed_plugin.zero_stage == 3
    return acc.distributed_type == DistributedType.FSDP


def _train(model: nn.Module, plan: StagePlan, ctx: LoopContext, resume: bool) -> nn.Module:
    """The stage's optimizer steps on the frozen model; the model as prepared by accelerate."""
    acc, opts = ctx.accelerator, plan.options
    order = BatchOrder(len(plan.dataset), opts.batch_size, opts.grad_accum, acc.num_processes, ctx.seed)
    total = order.total_steps(opts.epochs, opts.max_steps)
    optimizer = adamw(_param_groups(model, acc, plan.own_lr), opts.lr, opts.weight_decay)
    scheduler = get_scheduler(SCHEDULES[opts.schedule], optimizer,
                              num_warmup_steps=math.ceil(opts.warmup_ratio * total),
                              num_training_steps=total)
    fingerprint = _fingerprint(acc, plan, ctx.seed)
    if opts.grad_checkpointing:
        enable_checkpointing(model, {"use_reentrant": False})
    model.train()
    runner, optimizer = _prepare(acc, model, optimizer, plan)
    # After prepare: FSDP2 replaced every parameter by a sharded one (and re-pointed the
    # optimizer to them), so the tensors to clip and to save are the prepared model's.
    named = [(n, p) for n, p in acc.unwrap_model(runner).named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # Parameters FSDP2 left whole on every process: the loop averages their gradients.
    replicated = [p for m in replicated_modules(model) for p in m.parameters() if p.requires_grad] \
        if acc.is_fsdp2 else []
    layout = _resume_layout(acc)
    start = _resume(named, optimizer, scheduler, ctx.resume_dir, fingerprint, layout) if resume else 0
    logger = StageLogger(ctx, plan.name, total, start)
    try:
        for step in range(start, total):
            batches = [ctx.collator([plan.dataset[i] for i in rows])
                       for rows in order.micro_batches(step, acc.process_index)]
            loss, grad_norm = _step(runner, plan, batches, optimizer, params, acc, replicated)
            scheduler.step()
            done = step + 1
            if done % opts.log_every == 0 or done == total:
                logger.log(done, {"loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]},
                           samples=order.per_step)
            else:
                logger.advance(done, order.per_step)
            if opts.save_every and done % opts.save_every == 0 and done < total and layout != NO_RESUME:
                _save_resume(acc, fingerprint, named, optimizer, scheduler, ctx.resume_dir, done, layout)
    finally:
        logger.close()
        if opts.grad_checkpointing:
            disable_checkpointing(model)
        model.eval()
    plan.metrics.update(logger.last)
    return runner


def _fingerprint(acc: Accelerator, plan: StagePlan, seed: int) -> dict:
    """Everything the batches, the schedule and the resume files' layout depend on: a
    resume must run with the same."""
    fingerprint = {"options": asdict(plan.options), "world_size": acc.num_processes,
                   "samples": len(plan.dataset), "seed": seed}
    if acc.distributed_type in SHARDED:  # absent otherwise, as in states written before it
        fingerprint["sharding"] = acc.distributed_type.value
    return fingerprint


def _prepare(acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
             plan: StagePlan) -> tuple[nn.Module, torch.optim.Optimizer]:
    """accelerate's prepare, given what it cannot infer from the loop (which has no DataLoader)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = acc.state.deepspeed_plugin
        # Each stage completes the config as launched, not as the previous stage left it
        # (prepare fills it in place; the next stage may have another batch size).
        if not hasattr(plugin, "mose_launched_config"):
            plugin.mose_launched_config = copy.deepcopy(plugin.deepspeed_config)
        config = plugin.deepspeed_config  # accelerate reads this very dict: refill it in place
        config.clear()
        config.update(copy.deepcopy(plugin.mose_launched_config))
        complete_deepspeed_config(config, plan.options, acc.mixed_precision, acc.num_processes, plan.name)
    if acc.is_fsdp2:
        narrow_fsdp_wrap(acc.state.fsdp_plugin, model)
        acc.state.fsdp_plugin.ignored_modules = replicated_modules(model) or None
    runner, optimizer = acc.prepare(model, optimizer)
    if acc.is_fsdp2:
        # Like DDP's find_unused_parameters: a parameter one process's samples left without a
        # gradient is reduced as zeros, or the processes' reduce-scatters would not match.
        runner.set_reduce_scatter_unused_params(True)
    return runner, optimizer


def replicated_modules(model: nn.Module) -> list[nn.Module]:
    """What FSDP2 leaves whole on every process: the routers, which are tiny. The skill loss
    calls them outside the model's forward (on detached inputs), where FSDP2 would hold only
    each process's shard of their weights, and FSDP2's bf16 policy would all-gather their
    float32 weights in bf16 (rounded router weights flip skills)."""
    return [m for m in model.modules() if isinstance(m, Router)]


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def complete_deepspeed_config(config: dict[str, Any], opts: TrainOptions, mixed_precision: str,
                              world: int, stage: str = "stage") -> dict[str, Any]:
    """Fill, in place, the DeepSpeed config keys accelerate would take from a DataLoader
    (which the loop does not have) or from its own defaults (clipping at 1.0): the stage's
    micro-batch, no accumulation inside the engine (mose accumulates), the recipe's clipping
    (0: none). A value set explicitly to something else is an error, not silently overridden
    either way.

    Half precision runs as DeepSpeed's `torch_autocast`, the mixed precision every other
    launcher gets: weights stay float32 and matmuls compute in half precision. DeepSpeed's own
    `bf16` / `fp16` modes (which accelerate turns on from mixed_precision) instead cast every
    weight parameter by parameter (`p.data = p.data.to(dtype)`), routers included, whose
    rounded weights flip skills; mose turns them off whatever the launcher filled in.
    """
    clip = opts.max_grad_norm or 0.0
    wanted = {"train_micro_batch_size_per_gpu": opts.batch_size, "gradient_accumulation_steps": 1,
              "train_batch_size": opts.batch_size * world, "gradient_clipping": clip}
    recipe_key = {"train_micro_batch_size_per_gpu": "batch_size", "train_batch_size": "batch_size",
                  "gradient_accumulation_steps": "grad_accum", "gradient_clipping": "max_grad_norm"}
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif _differs(current, value):
            raise ValueError(f"the DeepSpeed config sets {key}: {current!r} but stages.{stage}."
                             f"{recipe_key[key]} asks for {value!r}; set it to 'auto' (or remove it) so "
                             "that the recipe decides")
    half = AUTOCAST_DTYPES.get(mixed_precision)
    config["bf16"] = {**config.get("bf16", {}), "enabled": False}
    config["fp16"] = {**config.get("fp16", {}), "enabled": False}
    config["torch_autocast"] = {"enabled": half is not None, **({"dtype": half} if half else {})}
    return config


def _differs(current: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return str(current).lower() != str(value).lower()
    return float(current) != float(value)


def narrow_fsdp_wrap(plugin: Any, model: nn.Module) -> list[str]:
    """Keep, of the FSDP config's layer classes to wrap, those this model has: the shipped
    config names both Qwen2-VL and Qwen2.5-VL's (and text-only) layers, and accelerate
    refuses a name the model lacks."""
    names = plugin.transformer_cls_names_to_wrap
    if not names:
        return []  # accelerate's default: the model's _no_split_modules
    present = {type(m).__name__ for m in model.modules()}
    kept = [n for n in names if n in present]
    if not kept:
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap ({','.join(names)}) names none of the "
                         f"model's layer classes; add its decoder layer class (one of "
                         f"{', '.join(sorted(n for n in present if n.endswith(('Layer', 'Block'))))})")
    plugin.transformer_cls_names_to_wrap = kept
    return kept


def _param_groups(model: nn.Module, acc: Accelerator,
                  own_lr: Sequence[tuple[nn.Module, float]] = ()) -> list[dict]:
    """The trainable parameters in optimizer groups: one per peak lr (`own_lr`'s modules at
    theirs, the rest at the optimizer's default), and under FSDP2 those it leaves whole in
    groups of their own, as the fused step runs per group and cannot mix sharded and plain tensors."""
    lr_of = {id(p): lr for module, lr in own_lr for p in module.parameters()}
    whole = {id(p) for m in replicated_modules(model) for p in m.parameters()} if acc.is_fsdp2 else set()
    groups: dict[tuple[float | None, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((lr_of.get(id(p)), id(p) in whole), []).append(p)
    # Sharded groups first, as before there were lr groups (resume states keep their order).
    ordered = sorted(groups.items(), key=lambda item: item[0][1])
    return [{"params": ps} if lr is None else {"params": ps, "lr": lr} for (lr, _), ps in ordered]


def adamw(params: list[nn.Parameter] | list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: the stacked experts hold every expert's
    moments, and on the CPU the fused step is 3-4x faster than the per-tensor one.
    `params`: parameters, or parameter groups ({"params": [...]})."""
    flat = [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in flat)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _step(runner: nn.Module, plan: StagePlan, batches: list[dict[str, torch.Tensor]],
          optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
          acc: Accelerator, replicated: list[nn.Parameter] = ()) -> tuple[float, float]:
    """One optimizer step over the micro-batches: (mean loss over all processes, gradient norm).

    `replicated`: parameters whose gradients no wrapper averages over the processes (those
    FSDP2 leaves whole), averaged here as DDP and FSDP average theirs.
    """
    items = sum(_items(b) for b in batches)
    global_items = acc.reduce(torch.tensor(float(items), device=acc.device), "sum").item()
    # The process-mean of gradients (DDP, FSDP) times `world` makes the sum over all items.
    scale = acc.num_processes / max(global_items, 1.0)
    total = 0.0
    for i, batch in enumerate(batches):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        last = i == len(batches) - 1
        sync = nullcontext() if last else acc.no_sync(runner)
        with sync:
            with acc.autocast():
                loss_sum = plan.objective(runner, batch)
            acc.backward(loss_sum * scale)
        total += loss_sum.item()
    average_gradients(replicated, acc)
    max_norm = plan.options.max_grad_norm or math.inf  # inf: measure, do not clip
    grad_norm = acc.clip_grad_norm_(params, max_norm)  # unscales fp16, knows FSDP shards
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = acc.reduce(torch.tensor(total, device=acc.device), "sum").item() / max(global_items, 1.0)
    return loss, math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed clips itself


def average_gradients(params: list[nn.Parameter], acc: Accelerator) -> None:
    """The process-mean of these parameters' gradients, in one collective (a parameter this
    process's samples left without a gradient counts as zeros, so every process sends the same)."""
    if not params or acc.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")  # (sum of numels,)
    for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = chunk.view_as(p)


def _items(batch: dict[str, torch.Tensor]) -> float:
    """What the stage's loss averages over: answer tokens."""
    return float((batch["labels"][:, 1:] != -100).sum())


# Resume layouts: whole tensors written by the main process (one process, DDP), one part
# per process holding its shards (FSDP2), or none (DeepSpeed, whose engine keeps its own
# flattened, partitioned optimizer state: an interrupted stage restarts).
WHOLE, NO_RESUME = None, "none"


def _resume_layout(acc: Accelerator) -> str | None:
    if acc.distributed_type == DistributedType.DEEPSPEED or (
            acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2):
        return NO_RESUME
    if acc.is_fsdp2:
        return f"rank-{acc.process_index:05d}"
    return WHOLE


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _resume(named: list[tuple[str, nn.Parameter]], optimizer, scheduler, folder: Path,
            fingerprint: dict, layout: str | None) -> int:
    if layout == NO_RESUME:
        return 0
    state = load_resume(folder, layout)
    if state is None:
        return 0
    current = json.loads(json.dumps(fingerprint))  # as the saved one went through JSON
    if state.fingerprint != current:
        changed = sorted(k for k in current.keys() | state.fingerprint.keys()
                         if state.fingerprint.get(k) != current.get(k))
        options = sorted(k for k, v in current["options"].items()
                         if state.fingerprint.get("options", {}).get(k) != v)
        raise ValueError(f"{folder}: the interrupted stage ran with other settings ({', '.join(changed)}"
                         f"{': ' + ', '.join(options) if options else ''}); resume with the same recipe and "
                         "processes, or delete that folder to start the stage over")
    copy_tensors({n: _local(p) for n, p in named}, state.trainable, folder)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict({"state": {i: {k: _like(v, params[i], k) for k, v in moments.items()}
                                         for i, moments in state.optimizer["state"].items()},
                               "param_groups": state.optimizer["param_groups"]})
    scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})
    restore_rng(state.rng)
    return state.step


def _like(saved: torch.Tensor, param: torch.Tensor, key: str) -> torch.Tensor:
    """A saved moment back as the sharded tensor its parameter is (AdamW's `step` stays plain)."""
    if not isinstance(param, DTensor) or key == "step":
        return saved
    return DTensor.from_local(saved.to(param.device), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())


def _save_resume(acc: Accelerator, fingerprint: dict, named: list[tuple[str, nn.Parameter]],
                 optimizer, scheduler, folder: Path, step: int, layout: str | None) -> None:
    """Every process writes its part of a sharded state (after the main one made the folder),
    the main process alone a whole one; the main process renames it into place once all are done."""
    state = optimizer.state_dict()
    if layout == WHOLE:
        if acc.is_main_process:
            tmp = begin_resume(folder, step)
            write_resume_part(tmp, dict(named), state["state"])
            finish_resume(folder, step, fingerprint, state["param_groups"], scheduler)
        acc.wait_for_everyone()
        return
    if acc.is_main_process:
        begin_resume(folder, step)
    acc.wait_for_everyone()
    moments = {i: {k: _local(v) for k, v in per_param.items()} for i, per_param in state["state"].items()}
    write_resume_part(temp_folder(folder, step), {n: _local(p) for n, p in named}, moments, layout)
    acc.wait_for_everyone()
    if acc.is_main_process:
        finish_resume(folder, step, fingerprint, state["param_groups"], scheduler, parts=acc.num_processes)
    acc.wait_for_everyone()


def _metrics_from(path: Path, start: int):
    """metrics.jsonl opened for appending after step `start`: the lines of steps a resumed
    run does again (after its last resume state) are dropped, a fresh start drops all."""
    kept = []
    if start and path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= start]
    path.write_text("".join(kept))
    return path.open("a")


class StageLogger:
    """Progress bar with loss and samples/s; TensorBoard and metrics.jsonl on the main process."""

    def __init__(self, ctx: LoopContext, name: str, total: int, start: int) -> None:
        self.main = ctx.accelerator.is_main_process
        self.last: dict[str, float] = {}
        self.started, self.samples = time.perf_counter(), 0
        self.progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 disable=not (ctx.progress and self.main),
                                 # No refresh thread: on a busy CPU it stalls torch's spinning
                                 # OpenMP workers (10x slower steps on 2 cores); refresh per step.
                                 auto_refresh=False)
        self.task = self.progress.add_task(name, total=total, completed=start, status="")
        self.progress.start()
        self.writer = None
        if self.main:
            ctx.log_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_file = _metrics_from(ctx.log_dir / "metrics.jsonl", start)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install only loses the events
                SummaryWriter = None
            self.writer = SummaryWriter(str(ctx.log_dir)) if SummaryWriter else None

    def advance(self, step: int, samples: int) -> None:
        self.samples += samples
        self.progress.update(self.task, completed=step, refresh=True)

    def log(self, step: int, values: dict[str, float], samples: int) -> None:
        self.advance(step, samples)
        values = {**values, "samples_per_s": self.samples / (time.perf_counter() - self.started)}
        self.progress.update(self.task, refresh=True, status=f"loss {values['loss']:.4f} · "
                             f"{values['samples_per_s']:.1f} samples/s")
        self.write(step, values)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.last.update(values)
        if not self.main:
            return
        self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.progress.stop()
        if self.main:
            self.metrics_file.close()
            if self.writer is not None:
                self.writer.close()
