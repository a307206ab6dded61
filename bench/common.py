"""Shared by the benchmarks: interleaved timing, memory, FLOP ideals, tables.

Every figure is a median over repeated runs after warm-up, reported as a ratio
to a baseline measured in the same process. Variants are interleaved (the
order rotates each round), so that the machine's drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA events time it there)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    return p


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.quick:
        args.repeats, args.warmup = 3, 1
    torch.manual_seed(0)
    return device, getattr(torch, name)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call; CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def medians(variants: dict[str, Callable[[], object]], device: torch.device,
            repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per variant, interleaved with a rotating order."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(variants[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device, model: torch.nn.Module) -> float:
    """MiB: peak allocated on CUDA; on the CPU, the tensors autograd saves for backward
    (activations, not counting any of the model's weights: a frozen weight that a matmul saves
    for its input gradient is held anyway), which is what training memory grows with."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**20
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # views of one tensor share it: count it once
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def param_mib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def table(title: str, headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (pasteable into bench/README.md)."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"\n### {title}\n", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def device_line(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    return f"device: {name}; dtype: {str(dtype).removeprefix('torch.')}; torch {torch.__version__}"


def run_checks(main: Callable[[], object]) -> None:
    """Run a script of checks: a failed one (AssertionError) is one line on stderr and exit 1."""
    try:
        main()
    except AssertionError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        sys.exit(1)
