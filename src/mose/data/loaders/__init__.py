"""Loaders of the public benchmark formats, each yielding sample records.

Every loader yields `Sample`s, or `DataError`s for records it cannot read, so
the caller decides whether a bad record stops the conversion (the default) or
is skipped and counted (`skip_bad`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mose.data.loaders.coda_lm import load_coda_lm
from mose.data.loaders.drivelm import load_drivelm
from mose.data.loaders.jsonl import load_jsonl
from mose.data.loaders.robo2vlm import load_robo2vlm
from mose.data.schema import DataError, Sample, write_jsonl

Loader = Callable[..., Iterator[Sample | DataError]]
FORMATS: dict[str, Loader] = {
    "coda-lm": load_coda_lm,
    "robo2vlm": load_robo2vlm,
    "drivelm": load_drivelm,
    "jsonl": load_jsonl,
}


@dataclass
class ConvertReport:
    tasks: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(self.tasks.values())


def convert_dataset(fmt: str, source: str | Path, out: str | Path, images: str | Path | None = None,
                    skip_bad: bool = False) -> ConvertReport:
    """Convert a benchmark in a public format to a sample-record JSONL at `out`.

    Images a loader has to write (Robo2VLM's embedded ones, CODA-LM's region
    crops with their red box) go to a folder beside `out`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    report = ConvertReport()

    def samples() -> Iterator[Sample]:
        for item in FORMATS[fmt](Path(source), out=out, images=Path(images) if images else None):
            if isinstance(item, DataError):
                if not skip_bad:
                    raise item
                report.skipped.append(str(item))
                continue
            report.tasks[item.task] += 1
            yield item

    write_jsonl(out, samples())
    return report


__all__ = ["FORMATS", "ConvertReport", "convert_dataset"]
