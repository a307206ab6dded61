"""Robo2VLM (robot manipulation multiple choice): parquet shards with embedded images.

Columns: `id`, `question`, `choices` (a serialised list: JSON or a Python
literal), `correct_answer` (0-based int) and `image` (embedded bytes, as the
datasets Image feature stores them). Images are written beside the output JSONL.
"""

from __future__ import annotations

import ast
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from mose.data.schema import DataError, Sample, atomic_path

COLUMNS = ("id", "question", "choices", "correct_answer", "image")


def load_robo2vlm(source: Path, out: Path, images: Path | None = None) -> Iterator[Sample | DataError]:
    """Samples of one parquet file or a folder of shards."""
    import pyarrow.parquet as pq

    files = [source] if source.is_file() else sorted(source.rglob("*.parquet"))
    if not files:
        raise DataError(str(source), None, None, "no parquet file here")
    folder = out.parent / f"{out.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        parquet = pq.ParquetFile(file)
        missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise DataError(str(file), None, missing[0],
                            f"not a Robo2VLM shard: missing column(s) {missing}")
        for batch in parquet.iter_batches(batch_size=256, columns=list(COLUMNS)):
            for row in batch.to_pylist():
                yield _sample(row, file, folder)


def parse_choices(value: Any) -> list[str] | None:
    """A serialised list of strings (JSON or Python literal), or None if it is not one."""
    if isinstance(value, list):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return None
    else:
        return None
    if isinstance(parsed, tuple):
        parsed = list(parsed)
    if not isinstance(parsed, list) or not all(isinstance(c, str) for c in parsed):
        return None
    return parsed


def _sample(row: dict, file: Path, folder: Path) -> Sample | DataError:
    record = str(row.get("id"))
    choices = parse_choices(row.get("choices"))
    if not choices:
        return DataError(str(file), record, "choices",
                         f"not a serialised list of strings: {str(row.get('choices'))[:80]!r}")
    correct = row.get("correct_answer")
    if not isinstance(correct, int) or not 0 <= correct < len(choices):
        return DataError(str(file), record, "correct_answer",
                         f"{correct!r} is not a 0-based index into {len(choices)} choices")
    if not isinstance(row.get("question"), str):
        return DataError(str(file), record, "question", "expected a string")
    image = row.get("image")
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, bytes | bytearray):
        return DataError(str(file), record, "image", "no embedded image bytes")
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            suffix = {"JPEG": ".jpg", "PNG": ".png"}.get(decoded.format or "", ".png")
    except OSError as error:
        return DataError(str(file), record, "image", f"not an image: {error}")
    path = folder / f"{_safe(record)}{suffix}"
    if not path.is_file():
        with atomic_path(path) as temp:
            temp.write_bytes(data)
    return Sample(id=f"robo2vlm/{record}", images=[str(path)], question=row["question"],
                  answer=choices[correct], task="robo2vlm", choices=choices, correct=correct,
                  meta={"source": "robo2vlm", "file": file.name})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
