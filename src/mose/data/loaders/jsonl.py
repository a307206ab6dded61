"""Generic sample-record JSONL: validated, with every image checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mose.data.schema import DataError, Sample, iter_records


def load_jsonl(source: Path, out: Path | None = None,
               images: Path | None = None) -> Iterator[Sample | DataError]:
    """Records of a JSONL file; `images` (if given) is the root of relative image paths."""
    for item in iter_records(source, images):
        if isinstance(item, Sample):
            missing = [p for p in item.images if not Path(p).is_file()]
            if missing:
                item = DataError(str(source), item.id, "images", f"missing image {missing[0]}")
        yield item
