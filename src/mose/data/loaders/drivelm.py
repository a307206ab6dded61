"""DriveLM-nuScenes: scene → key frame → QA by stage (perception, prediction, planning, behavior).

The list a QA sits in is its stage; it becomes the sample's `task` and
`meta.stage`, which the shipped DriveLM rules turn into skill levels. Image
paths (six cameras) are resolved under the nuScenes root given as `images`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mose.data.schema import DataError, Sample

STAGES = ("perception", "prediction", "planning", "behavior")


def load_drivelm(source: Path, out: Path | None = None,
                 images: Path | None = None) -> Iterator[Sample | DataError]:
    if not source.is_file():
        raise DataError(str(source), None, None, "no such file")
    try:
        scenes = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(str(source), None, None, f"malformed JSON: {error}") from None
    if not isinstance(scenes, dict):
        raise DataError(str(source), None, None, "expected {scene_token: scene}")
    for scene_token, scene in scenes.items():
        frames = scene.get("key_frames") if isinstance(scene, dict) else None
        if not isinstance(frames, dict):
            yield DataError(str(source), scene_token, "key_frames", "expected an object")
            continue
        for frame_token, frame in frames.items():
            yield from _frame(source, scene_token, frame_token, frame, images)


def _camera_path(path: str, source: Path, root: Path | None) -> Path:
    """DriveLM writes paths like `../nuscenes/samples/CAM_FRONT/x.jpg`: keep from `samples/` on."""
    marker = path.find("samples/")
    if root is not None and marker >= 0:
        return root / path[marker:]
    return Path(path) if Path(path).is_absolute() else (source.parent / path).resolve()


def _frame(source: Path, scene: str, frame_token: str, frame: dict,
           root: Path | None) -> Iterator[Sample | DataError]:
    record = f"{scene}/{frame_token}"
    qa = frame.get("QA") if isinstance(frame, dict) else None
    if not isinstance(qa, dict):
        yield DataError(str(source), record, "QA", "expected {stage: [...]}")
        return
    cameras = frame.get("image_paths") or {}
    paths = {cam: _camera_path(p, source, root) for cam, p in cameras.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        yield DataError(str(source), record, "image_paths",
                        f"missing image {missing[0]} (pass --images, the nuScenes root)")
        return
    objects = list((frame.get("key_object_infos") or {}).keys())
    for stage, items in qa.items():
        if stage not in STAGES:
            yield DataError(str(source), record, f"QA.{stage}", f"unknown stage; expected {STAGES}")
            continue
        for i, item in enumerate(items or []):
            if not isinstance(item, dict) or not isinstance(item.get("Q"), str):
                yield DataError(str(source), f"{record}/{stage}/{i}", "Q", "expected a question string")
                continue
            yield Sample(id=f"drivelm/{record}/{stage}/{i}", images=[str(p) for p in paths.values()],
                         question=item["Q"], answer=item.get("A"), task=stage,
                         meta={"source": "drivelm", "stage": stage, "scene": scene,
                               "frame": frame_token, "cameras": list(paths),
                               "key_objects": objects, "tag": item.get("tag")})
