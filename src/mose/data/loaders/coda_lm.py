"""CODA-LM (driving corner cases): per-image annotation JSONs, or the `vqa_anno` JSONL form.

Layout: `CODA-LM/Test/test_0001.json` annotates `<CODA2022>/test/images/0001.jpg`
(the file name's prefix is the CODA2022 split, its number the image). One file
gives three tasks: general perception, region perception (one per region, on a
cached copy of the image with a 2 px red rectangle around the box) and driving
suggestion. The prompts are mose's wording of the three official tasks.

A split folder holding `vqa_anno/` (the official `convert2vqa.py` output) is read
from there instead, with the official questions; each region row still takes
its `category_name` (and key and box) from the annotation file beside it, so
both forms give regions their category.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from mose.data.schema import DataError, Sample, atomic_path

CATEGORY_KEYS = ("vehicles", "vulnerable_road_users", "traffic signs", "traffic lights",
                 "traffic cones", "barriers", "other objects")
SUMMARY_KEY = "description and explanation"
PREAMBLE = (
    "This image was taken from the ego car's viewpoint. Describe every object that affects how "
    "the ego car should drive, in seven categories: vehicles, vulnerable road users, traffic signs, "
    "traffic lights, traffic cones, barriers and other objects. For each, give its appearance, "
    "position and heading, and explain why it matters to the ego car."
)
QUESTIONS = {
    "general_perception": PREAMBLE,
    "region_perception": "Describe the object inside the red rectangle and explain why it affects "
                         "the ego car's driving.",
    "driving_suggestion": PREAMBLE + " Then give driving suggestions for the ego car.",
}
NAME = re.compile(r"^(val|test|train)_(\d+)$")


def load_coda_lm(source: Path, out: Path, images: Path | None = None) -> Iterator[Sample | DataError]:
    """Samples of a CODA-LM split folder (e.g. `CODA-LM/Test`); `images` is the CODA2022 root."""
    if not source.is_dir():
        raise DataError(str(source), None, None, "not a CODA-LM split folder")
    vqa = source / "vqa_anno"
    if vqa.is_dir():
        yield from _from_vqa_anno(vqa, images)
        return
    files = sorted(source.glob("*.json"))
    if not files:
        raise DataError(str(source), None, None, "no annotation files (*.json) or vqa_anno/ folder")
    crops = out.parent / f"{out.stem}_images"
    for file in files:
        yield from _from_annotation(file, images, crops)


def _image_of(file: Path, images: Path | None) -> Path | DataError:
    match = NAME.match(file.stem)
    if not match:
        return DataError(str(file), file.stem, None, "file name is not <split>_<number>.json")
    if images is None:
        return DataError(str(file), file.stem, "image", "pass --images, the CODA2022 root folder")
    split, number = match.groups()
    path = images / split / "images" / f"{number}.jpg"
    if not path.is_file():
        return DataError(str(file), file.stem, "image", f"missing image {path}")
    return path


def _from_annotation(file: Path, images: Path | None, crops: Path) -> Iterator[Sample | DataError]:
    record = file.stem
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        yield DataError(str(file), record, None, f"malformed JSON: {error}")
        return
    if "suggestions" in data or any(k in data for k in CATEGORY_KEYS):
        yield DataError(str(file), record, None,
                        "this is the old CODA-LM release (category lists at top level, "
                        "`suggestions`, no region task); download the current release")
        return
    image = _image_of(file, images)
    if isinstance(image, DataError):
        yield image
        return
    meta = {"source": "coda-lm", "file": file.name}
    general = data.get("general_perception")
    if general is not None:
        answer = _general_answer(general, file, record)
        if isinstance(answer, DataError):
            yield answer
        else:
            counts = {k: len(general.get(k) or []) for k in CATEGORY_KEYS}
            yield Sample(id=f"coda/{record}/general", images=[str(image)],
                         question=QUESTIONS["general_perception"], answer=answer,
                         task="general_perception", meta={**meta, "objects": counts})
    for key, region in (data.get("region_perception") or {}).items():
        yield _region(region, key, image, file, crops, meta)
    suggestion = data.get("driving_suggestion")
    if suggestion is not None:
        if not isinstance(suggestion, str):
            yield DataError(str(file), record, "driving_suggestion", "expected a string")
        else:
            yield Sample(id=f"coda/{record}/suggestion", images=[str(image)],
                         question=QUESTIONS["driving_suggestion"], answer=suggestion,
                         task="driving_suggestion", meta=meta)


def _general_answer(general: dict, file: Path, record: str) -> str | DataError:
    if not isinstance(general, dict):
        return DataError(str(file), record, "general_perception", "expected an object")
    if isinstance(general.get(SUMMARY_KEY), str):
        return general[SUMMARY_KEY]
    parts = []
    for key in CATEGORY_KEYS:
        for item in general.get(key) or []:
            if not isinstance(item, dict):
                return DataError(str(file), record, f"general_perception.{key}",
                                 "expected {description, explanation} objects")
            parts.append(f"{key}: {item.get('description', '')} {item.get('explanation', '')}".strip())
    return "\n".join(parts)


def _region(region: dict, key: str, image: Path, file: Path, crops: Path,
            meta: dict) -> Sample | DataError:
    record = f"{file.stem} region {key}"
    box = region.get("box") if isinstance(region, dict) else None
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
        return DataError(str(file), record, "box", f"expected [x, y, w, h], got {box!r}")
    answer = region.get(SUMMARY_KEY)
    if not isinstance(answer, str):
        return DataError(str(file), record, SUMMARY_KEY, "expected a string")
    boxed = crops / f"{file.stem}_region_{key}.jpg"
    if not boxed.is_file():  # cached: a file that exists was renamed into place complete
        with Image.open(image) as source:
            drawn = source.convert("RGB")
        x, y, w, h = box
        ImageDraw.Draw(drawn).rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=2)
        boxed.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(boxed) as temp:
            drawn.save(temp, format="JPEG", quality=95)
    return Sample(id=f"coda/{file.stem}/region/{key}", images=[str(boxed)],
                  question=QUESTIONS["region_perception"], answer=answer, task="region_perception",
                  meta={**meta, "box": [float(v) for v in box],
                        "category": region.get("category_name"), "original_image": str(image)})


def _from_vqa_anno(folder: Path, images: Path | None) -> Iterator[Sample | DataError]:
    """Samples of `vqa_anno/*.jsonl`; a region keeps its annotation file's category, key and box.

    The official conversion writes region rows without the category; it is taken from the
    split's annotation files beside `vqa_anno/` (`test_0001.json` for the row whose image is
    `test/images_w_boxes/0001_object_1.jpg`, region "1"), as the official `convert2eval.py`
    does. With no annotation files there, regions have no category.
    """
    annotations = _Annotations(folder.parent)
    for task in QUESTIONS:
        file = folder / f"{task}.jsonl"
        if not file.is_file():
            continue
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield DataError(str(file), f"at line {number}", None, f"malformed JSON: {error}")
                continue
            record = row.get("question_id", f"at line {number}")
            path = _vqa_image(row.get("image"), folder, images)
            if path is None:
                yield DataError(str(file), record, "image", f"missing image {row.get('image')!r}")
                continue
            if not isinstance(row.get("question"), str):
                yield DataError(str(file), record, "question", "expected a string")
                continue
            meta = {"source": "coda-lm", "question_id": record, "image": row["image"]}
            if task == "region_perception" and annotations:
                region = annotations.region(row["image"])
                if isinstance(region, str):
                    yield DataError(str(file), record, "image", region)
                    continue
                stem, key, data = region
                reference = data.get(SUMMARY_KEY)
                given = row.get("answer")
                if given is not None and isinstance(reference, str) and given != reference:
                    yield DataError(str(file), record, "answer", f"differs from region {key} of {stem}.json: "
                                    "vqa_anno and the annotation files are not of the same release")
                    continue
                box = data.get("box")
                numbers = isinstance(box, list) and all(isinstance(v, int | float) for v in box)
                meta |= {"file": f"{stem}.json", "region": key, "category": data.get("category_name"),
                         **({"box": [float(v) for v in box]} if numbers else {})}
            yield Sample(id=f"coda/vqa/{task}/{record}", images=[str(path)], question=row["question"],
                         answer=row.get("answer"), task=task, meta=meta)


_BOXED = re.compile(r"^(\d+)_object_(.+)\.jpg$")


class _Annotations:
    """The annotation files of a split folder, read when a region row first needs one."""

    def __init__(self, split: Path) -> None:
        self.split = split
        self.files = {f.stem: f for f in sorted(split.glob("*.json")) if NAME.match(f.stem)}
        self.loaded: dict[str, dict | str] = {}

    def __bool__(self) -> bool:
        return bool(self.files)

    def region(self, image: str) -> tuple[str, str, dict] | str:
        """(file stem, region key, region) of a boxed image path, or why there is none."""
        path = Path(image)
        match = _BOXED.match(path.name)
        if not match:
            return (f"{image!r} is not a boxed region image (<split>/images_w_boxes/"
                    "<number>_object_<key>.jpg), so its annotation cannot be found")
        number, key = match.groups()
        stem = f"{path.parent.parent.name}_{number}"
        if stem not in self.files:  # no split folder in the path: the one file with that number
            candidates = [s for s in self.files if s.endswith(f"_{number}")]
            if len(candidates) != 1:
                return f"no annotation file {stem}.json in {self.split} for {image!r}"
            stem = candidates[0]
        data = self._load(stem)
        if isinstance(data, str):
            return data
        regions = data.get("region_perception")
        if not isinstance(regions, dict) or not isinstance(regions.get(key), dict):
            return f"{stem}.json has no region_perception region {key!r} for {image!r}"
        return stem, key, regions[key]

    def _load(self, stem: str) -> dict | str:
        if stem not in self.loaded:
            try:
                data = json.loads(self.files[stem].read_text(encoding="utf-8"))
                self.loaded[stem] = (data if isinstance(data, dict)
                                     else f"{self.files[stem]}: expected an object")
            except json.JSONDecodeError as error:
                self.loaded[stem] = f"{self.files[stem]}: malformed JSON: {error}"
        return self.loaded[stem]


def _vqa_image(image: str | None, folder: Path, root: Path | None) -> Path | None:
    """Image paths in vqa_anno are relative to an unrecorded root (officially the folder holding
    `CODA-LM/`, `val/` and `test/`): try the likely ones."""
    if not isinstance(image, str):
        return None
    candidates = [Path(image)] if Path(image).is_absolute() else [
        *([root / image] if root else []), folder.parent / image, folder.parent.parent / image,
        folder.parent.parent.parent / image]
    return next((p.resolve() for p in candidates if p.is_file()), None)
