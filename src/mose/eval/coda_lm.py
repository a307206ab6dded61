"""Predictions in the layout CODA-LM's official evaluation scripts read (`mose predict --format coda-lm`).

Checked against the CODA-LM repository's `evaluation/README.md`,
`convert2vqa.py` and `evaluation/stage{1,2,3}_eval_batch.py`:

- one JSONL file per task in a results folder: `general_perception_answer.jsonl`,
  `driving_suggestion_answer.jsonl`, `region_perception_answer.jsonl`;
- one row per question, `{"question_id", "image", "question", "answer"}`, as the
  VQA conversion writes them, with the model's answer in `answer`;
- `question_id` is an int: for general perception and driving suggestion the
  0-based index of the image's annotation file among the split's files sorted
  by name (stages 1 and 2 assert `answers[i]["question_id"] == i` after sorting
  both); for region perception a running index over those sorted files and,
  within a file, its regions in file order;
- stage 3 reads `region_perception_answer_w_label.jsonl`, the same rows plus
  `label_name` (the region's ground-truth `category_name`), which the official
  `convert2eval.py` adds from the annotations. It is written here too when
  every region reference knows its category: records from the annotation
  files do, and so do `vqa_anno` records converted from a split folder that
  holds the annotation files beside `vqa_anno/` (the official layout).

Only `question_id`, `answer`, `question` and `label_name` are read by the
scorers; `question` holds the question the model was asked and `image` the
CODA2022-relative image path (`test/images/0001.jpg`; region images
`test/images_w_boxes/0001_object_1.jpg`) or, for `vqa_anno` records, the
`image` of their row (the same path). The indices are computed over the
references given, so pass the whole split (or exactly the annotation files
copied for a subset such as Mini), as the official scripts expect of the
reference folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mose.data.schema import DataError, Sample, atomic_path
from mose.eval.predictions import Prediction, read_predictions

TASK_FILES = {
    "general_perception": "general_perception_answer.jsonl",
    "driving_suggestion": "driving_suggestion_answer.jsonl",
    "region_perception": "region_perception_answer.jsonl",
}
REGION_WITH_LABELS = "region_perception_answer_w_label.jsonl"
_FILE_ID = re.compile(r"^coda/(?P<stem>[a-z]+_\d+)/(?:general|suggestion|region/(?P<key>[^/]+))$")


def write_coda_lm_answers(predictions: Mapping[str, Prediction] | Iterable[Prediction] | str | Path,
                          references: Iterable[Sample], out_dir: str | Path,
                          source: str = "references") -> list[Path]:
    """Write the per-task answer files for CODA-LM's evaluation scripts; returns the paths.

    Args:
        predictions: `predict`'s output file, or its predictions (by id or listed).
        references: the CODA-LM sample records predicted on (`mose data convert`
            output), from annotation files or from `vqa_anno`.
        source: the references' file name, for error messages.
    """
    name = str(predictions) if isinstance(predictions, str | Path) else "predictions"
    if isinstance(predictions, str | Path):
        predictions = read_predictions(predictions)
    elif not isinstance(predictions, Mapping):
        predictions = {p.id: p for p in predictions}
    rows = _rows(list(references), source)
    missing = [row["id"] for task_rows in rows.values() for row in task_rows if row["id"] not in predictions]
    if missing:  # checked before any file is written, so no task's file is left half a set
        raise ValueError(f"{name}: no answer for {len(missing)} {source} record(s), "
                         f"first {missing[0]!r}")
    out_dir = Path(out_dir)
    written = []
    for task, file_name in TASK_FILES.items():
        task_rows = sorted(rows.get(task, []), key=lambda row: row["question_id"])
        if not task_rows:
            continue
        labels = [row.pop("label_name") for row in task_rows]
        for row in task_rows:
            row["answer"] = predictions[row.pop("id")].answer
        written.append(_write(out_dir / file_name, task_rows))
        if task == "region_perception" and all(label is not None for label in labels):
            with_labels = [{**row, "label_name": label} for row, label in zip(task_rows, labels, strict=True)]
            written.append(_write(out_dir / REGION_WITH_LABELS, with_labels))
    return written


def _rows(references: list[Sample], source: str) -> dict[str, list[dict[str, Any]]]:
    """Per task, the answer rows without answers yet (`id` names the sample to fill in)."""
    from_files = [s for s in references if "question_id" not in s.meta]
    stems = sorted({_file_id(s, source)[0] for s in from_files}, key=lambda stem: stem + ".json")
    image_index = {stem: i for i, stem in enumerate(stems)}
    region_order = sorted((s for s in from_files if s.task == "region_perception"),
                          key=lambda s: image_index[_file_id(s, source)[0]])  # stable: file order kept
    region_index = {s.id: i for i, s in enumerate(region_order)}
    rows: dict[str, list[dict[str, Any]]] = {}
    for sample in references:
        if sample.task not in TASK_FILES:
            raise DataError(source, sample.id, "task", f"{sample.task!r} is not a CODA-LM task; "
                                                       f"expected one of {', '.join(TASK_FILES)}")
        label = sample.meta.get("category") if sample.task == "region_perception" else None
        if "question_id" in sample.meta:  # a vqa_anno record keeps the official index and path
            question_id = _int_id(sample, source)
            image = sample.meta.get("image") or (sample.images[0] if sample.images else "")
        else:
            stem, key = _file_id(sample, source)
            split, number = stem.split("_")
            if sample.task == "region_perception":
                question_id = region_index[sample.id]
                image = f"{split}/images_w_boxes/{number}_object_{key}.jpg"
            else:
                question_id = image_index[stem]
                image = f"{split}/images/{number}.jpg"
        # The official rows' key order; `id` and `label_name` are taken out before writing.
        row = {"question_id": question_id, "image": image, "question": sample.question,
               "id": sample.id, "label_name": label}
        rows.setdefault(sample.task, []).append(row)
    for task, task_rows in rows.items():
        _check_unique(task, task_rows, source)
    return rows


def _file_id(sample: Sample, source: str) -> tuple[str, str | None]:
    match = _FILE_ID.match(sample.id)
    if not match:
        raise DataError(source, sample.id, "id", "not a CODA-LM record id (coda/<split>_<number>/"
                        "general|suggestion|region/<key>) and no meta.question_id")
    return match["stem"], match["key"]


def _int_id(sample: Sample, source: str) -> int:
    value = sample.meta["question_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise DataError(source, sample.id, "meta.question_id", f"expected an integer, got {value!r}")


def _check_unique(task: str, rows: list[dict[str, Any]], source: str) -> None:
    seen: dict[int, str] = {}
    for row in rows:
        if row["question_id"] in seen:
            raise DataError(source, row["id"], "id", f"{task} question_id {row['question_id']} is "
                            f"also that of record {seen[row['question_id']]!r}")
        seen[row["question_id"]] = row["id"]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with atomic_path(path) as temp, temp.open("w", encoding="utf-8") as out:
        out.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
