"""The training loop every stage shares, on Hugging Face Accelerate.

A stage hands the loop its trainable modules, its dataset and an objective
that returns the loss summed over the micro-batch's items. The
loop divides by the number of items in the whole optimizer step across all
processes, so gradient accumulation and data parallelism give the gradient of
one big batch: one process with batch 4 equals two with batch 2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import get_scheduler

from mose.data.collate import Collator
from mose.train.checkpoint import load_resume, load_trainable, restore_rng, save_resume
from mose.train.data import BatchOrder
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
    sharded = acc.distributed_type in SHARDED
    if acc.distributed_type == DistributedType.DEEPSPEED and opts.grad_accum > 1:
        # The DeepSpeed engine steps at every backward unless it accumulates itself.
        raise ValueError(f"stage {plan.name!r}: under DeepSpeed set grad_accum 1 and raise "
                         "batch_size (or the number of processes) instead")
    named = freeze_all_but(model, plan.trainable, plan.frozen)
    params = [p for _, p in named]
    order = BatchOrder(len(plan.dataset), opts.batch_size, opts.grad_accum, acc.num_processes, ctx.seed)
    total = order.total_steps(opts.epochs, opts.max_steps)
    optimizer = adamw(params, opts.lr, opts.weight_decay)
    scheduler = get_scheduler(SCHEDULES[opts.schedule], optimizer,
                              num_warmup_steps=math.ceil(opts.warmup_ratio * total),
                              num_training_steps=total)
    # Everything the batches and the schedule depend on: a resume must run with the same.
    fingerprint = {"options": asdict(opts), "world_size": acc.num_processes,
                   "samples": len(plan.dataset), "seed": ctx.seed}
    start = _resume(model, optimizer, scheduler, ctx.resume_dir, fingerprint) if resume else 0
    if opts.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    runner, optimizer = acc.prepare(model, optimizer)
    logger = StageLogger(ctx, plan.name, total, start)
    try:
        for step in range(start, total):
            batches = [ctx.collator([plan.dataset[i] for i in rows])
                       for rows in order.micro_batches(step, acc.process_index)]
            loss, grad_norm = _step(runner, plan, batches, optimizer, params, acc)
            scheduler.step()
            done = step + 1
            if done % opts.log_every == 0 or done == total:
                logger.log(done, {"loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]},
                           samples=order.per_step)
            else:
                logger.advance(done, order.per_step)
            # Resume states hold whole trainable tensors, which sharded runs do not have.
            if opts.save_every and done % opts.save_every == 0 and done < total and not sharded:
                _save_resume(acc, fingerprint, named, optimizer, scheduler, ctx.resume_dir, done)
    finally:
        logger.close()
        if opts.grad_checkpointing:
            model.activation_checkpointing_disable()
        model.eval()
    plan.metrics.update(logger.last)
    state_dict = acc.get_state_dict(runner) if sharded else None
    acc.free_memory()  # drop accelerate's references to this stage's model and optimizer
    return state_dict


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: the stacked experts hold every expert's
    moments, and on the CPU the fused step is 3-4x faster than the per-tensor one."""
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _step(runner: nn.Module, plan: StagePlan, batches: list[dict[str, torch.Tensor]],
          optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
          acc: Accelerator) -> tuple[float, float]:
    """One optimizer step over the micro-batches: (mean loss over all processes, gradient norm)."""
    items = sum(_items(b) for b in batches)
    global_items = acc.reduce(torch.tensor(float(items), device=acc.device), "sum").item()
    # The process-mean of gradients (DDP) times `world` makes the sum over all items.
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
    max_norm = plan.options.max_grad_norm or math.inf  # inf: measure, do not clip
    grad_norm = acc.clip_grad_norm_(params, max_norm)  # unscales fp16, knows FSDP shards
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = acc.reduce(torch.tensor(total, device=acc.device), "sum").item() / max(global_items, 1.0)
    return loss, math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed clips itself


def _items(batch: dict[str, torch.Tensor]) -> float:
    """What the stage's loss averages over: answer tokens."""
    return float((batch["labels"][:, 1:] != -100).sum())


def _resume(model, optimizer, scheduler, folder: Path, fingerprint: dict) -> int:
    state = load_resume(folder)
    if state is None:
        return 0
    current = json.loads(json.dumps(fingerprint))  # as the saved one went through JSON
    if state.fingerprint != current:
        changed = sorted(k for k in current if state.fingerprint.get(k) != current[k])
        options = sorted(k for k, v in current["options"].items()
                         if state.fingerprint["options"].get(k) != v)
        raise ValueError(f"{folder}: the interrupted stage ran with other settings ({', '.join(changed)}"
                         f"{': ' + ', '.join(options) if options else ''}); resume with the same recipe and "
                         "processes, or delete that folder to start the stage over")
    load_trainable(model, state.trainable, folder)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})
    restore_rng(state.rng)
    return state.step


def _save_resume(acc, fingerprint, named, optimizer, scheduler, folder: Path, step: int) -> None:
    if acc.is_main_process:
        save_resume(folder, step, fingerprint, dict(named), optimizer, scheduler)
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
