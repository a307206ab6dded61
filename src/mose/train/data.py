"""What each stage learns from: records read once, subsets chosen by seed, and the
order batches are drawn in, a pure function of (seed, step) so a resumed run
sees the same batches an uninterrupted one would have."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from mose.data import Sample, read_jsonl
from mose.data.collate import SampleEncoder


class RecordCache:
    """Each JSONL read and validated once per run, however many stages use it."""

    def __init__(self) -> None:
        self._records: dict[Path, list[Sample]] = {}

    def __call__(self, path: str | Path) -> list[Sample]:
        key = Path(path).resolve()
        if key not in self._records:
            if not key.is_file():
                raise FileNotFoundError(f"{path}: no such data file")
            self._records[key] = list(read_jsonl(key))
        return self._records[key]


class EncodingCache:
    """Encoded samples kept across the stages of a run, or the runs of a study (many runs
    on one file), per file, encoder settings and answer/prompt-only.

    Only the `keep` most recently used sets stay: items hold their images' pixels.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._sets: OrderedDict[tuple, dict[tuple, dict]] = OrderedDict()

    def __call__(self, source: str | Path, encoder: SampleEncoder, with_answer: bool) -> dict[tuple, dict]:
        """The set (a sample's content → its item) for records of `source` encoded this way."""
        path = Path(source).resolve()
        stat = path.stat()  # an atomic rewrite changes the inode, an edit the size or time
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, encoder.settings(), with_answer)
        if key not in self._sets:
            self._sets[key] = {}
            while len(self._sets) > self.keep:
                self._sets.popitem(last=False)
        self._sets.move_to_end(key)
        return self._sets[key]


def subset(samples: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    """`size` samples chosen by seed, in their original order."""
    if size >= len(samples):
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), size))
    return [samples[i] for i in keep]


def fraction_of(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    if not 0 < fraction <= 1:
        raise ValueError(f"data.fraction must be in (0, 1], got {fraction}")
    return subset(samples, max(1, round(len(samples) * fraction)), seed)


def labelled_split(samples: Sequence[Sample], labelled: int | None, eval_size: int, seed: int,
                   held_out: Sequence[Sample] | None) -> tuple[list[Sample], list[Sample]]:
    """(router training set, held-out labelled set) from the samples that carry skills.

    Without an explicit held-out set, `eval_size` samples are split off first,
    so the training subset never contains them.
    """
    pool = [s for s in samples if s.skills is not None]
    if held_out is None:
        size = min(eval_size, len(pool) // 5)
        out = set(random.Random(seed).sample(range(len(pool)), size))
        held_out = [s for i, s in enumerate(pool) if i in out]
        pool = [s for i, s in enumerate(pool) if i not in out]
    else:
        held_out = [s for s in held_out if s.skills is not None]
    train = subset(pool, labelled, seed) if labelled is not None else pool
    return train, list(held_out)


class BatchOrder:
    """Which samples each process takes at each optimizer step.

    A step draws `batch_size * grad_accum * world` samples from a per-epoch
    permutation (the epoch's leftovers are dropped, so every process sees
    full micro-batches); micro-batch a of process r is row (a, r).
    """

    def __init__(self, num_samples: int, batch_size: int, grad_accum: int, world: int, seed: int):
        self.per_step = batch_size * grad_accum * world
        if num_samples < self.per_step:
            raise ValueError(f"{num_samples} samples cannot fill one step of batch_size {batch_size} x "
                             f"grad_accum {grad_accum} x {world} process(es): lower the batch")
        self.num_samples = num_samples
        self.shape = (grad_accum, world, batch_size)
        self.seed = seed
        self.steps_per_epoch = num_samples // self.per_step

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, round(epochs * self.steps_per_epoch))

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        chosen = order[k * self.per_step:(k + 1) * self.per_step].view(self.shape)  # (A, W, B)
        return chosen[:, rank].tolist()
