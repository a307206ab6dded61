"""The sample record every loader writes and every stage reads, and its JSONL files.

One JSON object per line with exactly these fields (`../DESIGN.md`):
id, images, question, answer, task, choices, correct, skills, meta. Image paths
are relative to the JSONL file's folder unless absolute. Files are written to a
temporary name and renamed, so a file that exists is complete. `meta` is the
source's own, with one key mose reads: `answer_with: "text"` makes a
multiple-choice record answered with its option's text instead of the letter
(`mose.data.collate.target_text`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ("id", "images", "question", "answer", "task", "choices", "correct", "skills", "meta")


class DataError(ValueError):
    """A bad input record: names the file, the record and the field."""

    def __init__(self, source: str, record: str | int | None, field_name: str | None, problem: str):
        where = source
        if record is not None:
            where += f", record {record}"
        if field_name:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")


@dataclass
class Sample:
    id: str
    images: list[str]
    question: str
    answer: str | None = None
    task: str = "vqa"
    choices: list[str] | None = None
    correct: int | None = None
    skills: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", record: str | int | None = None) -> Sample:
        """Validate one record; every problem names source, record and field."""
        if not isinstance(data, dict):
            raise DataError(source, record, None, f"expected a JSON object, got {type(data).__name__}")
        record = data.get("id", record)
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise DataError(source, record, sorted(unknown)[0],
                            f"unknown field(s) {sorted(unknown)}; source metadata belongs in `meta`")

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise DataError(source, record, name, f"expected {expected}, got {data.get(name)!r}")

        check("id", isinstance(data.get("id"), str) and data["id"] != "", "a non-empty string")
        images = data.get("images", [])
        check("images", isinstance(images, list) and all(isinstance(p, str) for p in images),
              "a list of paths")
        check("question", isinstance(data.get("question"), str), "a string")
        check("answer", data.get("answer") is None or isinstance(data["answer"], str),
              "a string or null")
        check("task", isinstance(data.get("task", "vqa"), str), "a string")
        choices, correct = data.get("choices"), data.get("correct")
        check("choices", choices is None or (isinstance(choices, list)
                                             and all(isinstance(c, str) for c in choices)),
              "a list of strings or null")
        check("correct", correct is None or (isinstance(correct, int) and not isinstance(correct, bool)),
              "an int or null")
        if correct is not None:
            check("correct", choices is not None and 0 <= correct < len(choices),
                  f"a 0-based index into {len(choices or [])} choices")
        skills = data.get("skills")
        check("skills", skills is None or (isinstance(skills, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in skills.items())),
            "an object {level: skill} or null")
        check("meta", isinstance(data.get("meta", {}), dict), "an object")
        return cls(id=data["id"], images=list(images), question=data["question"],
                   answer=data.get("answer"), task=data.get("task", "vqa"), choices=choices,
                   correct=correct, skills=skills, meta=dict(data.get("meta") or {}))


def iter_records(path: str | Path, image_root: str | Path | None = None) -> Iterator[Sample | DataError]:
    """Each record of a JSONL file as a Sample, or as the DataError that names its problem.

    Image paths become absolute, under `image_root` (default: the file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "no such file")
    root = Path(image_root) if image_root is not None else path.parent
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                sample = Sample.from_dict(json.loads(line), str(path), f"at line {number}")
            except json.JSONDecodeError as error:
                yield DataError(str(path), f"at line {number}", None, f"malformed JSON: {error}")
                continue
            except DataError as error:
                yield error
                continue
            sample.images = [str(resolve_image(root, p).resolve()) for p in sample.images]
            yield sample


def read_jsonl(path: str | Path) -> Iterator[Sample]:
    """Samples of a JSONL file, with their image paths made absolute; stops at a bad record."""
    for item in iter_records(path):
        if isinstance(item, DataError):
            raise item
        yield item


def resolve_image(folder: Path, image: str) -> Path:
    image_path = Path(image)
    return image_path if image_path.is_absolute() else folder / image_path


def relative_images(sample: Sample, folder: Path) -> Sample:
    """The sample with image paths under `folder` made relative to it (portable JSONL)."""
    images = []
    for image in sample.images:
        p = Path(image)
        images.append(str(p.relative_to(folder)) if p.is_absolute() and p.is_relative_to(folder)
                      else image)
    return Sample(**{**sample.to_dict(), "images": images})


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_jsonl(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples atomically; image paths under the file's folder become relative."""
    path = Path(path)
    folder = path.parent.resolve()
    count = 0
    with atomic_path(path) as temp, temp.open("w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(relative_images(sample, folder).to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count
