"""Generic sample-record JSONL: validated, with every image checked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mose.data.schema import DataError, Sample, resolve_image


def load_jsonl(source: Path, out: Path | None = None,
               images: Path | None = None) -> Iterator[Sample | DataError]:
    """Records of a JSONL file; `images` (if given) is the root of relative image paths."""
    if not source.is_file():
        raise DataError(str(source), None, None, "no such file")
    root_file = (images / "_") if images else source
    with source.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                sample = Sample.from_dict(json.loads(line), str(source), f"at line {number}")
            except json.JSONDecodeError as error:
                yield DataError(str(source), f"at line {number}", None, f"malformed JSON: {error}")
                continue
            except DataError as error:
                yield error
                continue
            sample.images = [str(resolve_image(root_file, p).resolve()) for p in sample.images]
            missing = [p for p in sample.images if not Path(p).is_file()]
            if missing:
                yield DataError(str(source), sample.id, "images", f"missing image {missing[0]}")
                continue
            yield sample
