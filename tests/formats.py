"""Small fixtures written in the public benchmarks' real formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image


def jpeg(path: Path, size=(64, 48), color="gray") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def coda_lm(root: Path) -> tuple[Path, Path]:
    """(CODA-LM/Test folder, CODA2022 root) with one annotated image and two regions."""
    images = root / "CODA2022"
    jpeg(images / "test" / "images" / "0001.jpg")
    split = root / "CODA-LM" / "Test"
    split.mkdir(parents=True)
    annotation = {
        "general_perception": {
            "vehicles": [{"description": "a white truck ahead", "explanation": "blocks the lane"}],
            "vulnerable_road_users": [],
            "traffic signs": [], "traffic lights": [],
            "traffic cones": [{"description": "three cones", "explanation": "narrow the road"}],
            "barriers": [], "other objects": [],
            "description and explanation": "A truck and cones narrow the lane ahead.",
        },
        "region_perception": {
            "1": {"description and explanation": "A pedestrian waits at the curb.",
                  "box": [10.0, 8.0, 12.5, 20.0], "category_name": "pedestrian"},
            "2": {"description and explanation": "Orange traffic cones mark road work.",
                  "box": [30.0, 20.0, 10.0, 10.0], "category_name": "traffic_cone"},
        },
        "driving_suggestion": "Slow down and change lanes to pass the cones with caution.",
    }
    (split / "test_0001.json").write_text(json.dumps(annotation))
    return split, images


def coda_lm_old(root: Path) -> Path:
    split = root / "old"
    split.mkdir(parents=True)
    (split / "test_0001.json").write_text(json.dumps(
        {"vehicles": [], "traffic cones": [], "suggestions": ["slow down"]}))
    return split


def robo2vlm(path: Path, rows: list[dict] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    rows = rows or [
        {"id": "ep1_q0", "question": "Is the robot's gripper open?",
         "choices": '["Yes", "No", "Cannot be determined", "Not applicable"]', "correct_answer": 1},
        {"id": "ep1_q1", "question": "Which object is CLOSEST to the camera?",
         "choices": "['cup', 'bowl', 'block', 'sponge', 'None of the above']", "correct_answer": 4},
    ]
    table = pa.Table.from_pylist([{**r, "image": image} for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def drivelm(root: Path) -> tuple[Path, Path]:
    """(DriveLM JSON, nuScenes root) with one key frame and QAs at every stage."""
    nuscenes = root / "nuscenes"
    cameras = {}
    for cam in ("CAM_FRONT", "CAM_BACK"):
        jpeg(nuscenes / "samples" / cam / f"{cam.lower()}.jpg")
        cameras[cam] = f"../nuscenes/samples/{cam}/{cam.lower()}.jpg"
    qa = {
        "perception": [{"Q": "What are the important objects? <c1,CAM_FRONT,258.3,442.5>",
                        "A": "There is a pedestrian crossing.", "C": None, "con_up": None,
                        "con_down": None, "cluster": None, "layer": None, "tag": [0]}],
        "prediction": [{"Q": "Is <c1,CAM_FRONT,258.3,442.5> going to cross the road?",
                        "A": "Yes.", "tag": [0]}],
        "planning": [{"Q": "What should the ego vehicle do?", "A": "Slow down and yield.",
                      "tag": [1]}],
        "behavior": [{"Q": "Predict the behavior of the ego vehicle.",
                      "A": "The ego vehicle is going straight. The ego vehicle is driving slowly.",
                      "tag": [5]}],
    }
    data = {"scene_a": {"scene_description": "busy street", "key_frames": {"frame_1": {
        "key_object_infos": {"<c1,CAM_FRONT,258.3,442.5>": {
            "Category": "Pedestrian", "Status": "Moving", "Visual_description": "adult",
            "2d_bbox": [200.0, 400.0, 300.0, 480.0]}},
        "QA": qa, "image_paths": cameras}}}}
    path = root / "drivelm" / "v1_train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path, nuscenes


def coda_lm_vqa(split: Path, images: Path, questions: dict[str, str]) -> Path:
    """`split/vqa_anno/` as CODA-LM's `convert2vqa.py` writes it for the annotation files in
    `split` (boxed images under `images/<split>/images_w_boxes/`); `questions` per task
    (placeholders: the official wording is not copied here)."""
    rows: dict[str, list[dict]] = {task: [] for task in questions}
    for index, file in enumerate(sorted(split.glob("*.json"))):
        data = json.loads(file.read_text())
        prefix, number = file.stem.split("_")
        image = f"{prefix}/images/{number}.jpg"
        general = data["general_perception"]["description and explanation"]
        rows["general_perception"].append({"question_id": index, "image": image,
                                           "question": questions["general_perception"], "answer": general})
        rows["driving_suggestion"].append({"question_id": index, "image": image,
                                           "question": questions["driving_suggestion"],
                                           "answer": data["driving_suggestion"]})
        for key, region in data["region_perception"].items():
            boxed = f"{prefix}/images_w_boxes/{number}_object_{key}.jpg"
            jpeg(images / boxed)
            rows["region_perception"].append({"question_id": len(rows["region_perception"]), "image": boxed,
                                              "question": questions["region_perception"],
                                              "answer": region["description and explanation"]})
    folder = split / "vqa_anno"
    folder.mkdir()
    for task, task_rows in rows.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    return folder


# The stand-in CODA-LM clone: the official evaluation scripts' shape (a judge class whose
# `__init__` sets `self.system_prompt`, a `template` with two {} fields, few-shot folders of
# high.json / low.json), with placeholder text of its own.
_STAGE_SCRIPT = '''import os


class GPTBatcher:
    def __init__(self, api_key, system_prompt=""):
        self.system_prompt = {system!r}

    def create_messages(self, message):
        few_shot = os.path.join(os.path.dirname(os.path.abspath(__file__)), {few_shot!r})
        template = {template!r}
        return few_shot, template
'''
_REGION_SCRIPT = '''class RegionEval(object):
    def __init__(self, reference_path, prediction_path):
        self.system_prompt = {system!r}

    def create_messages(self, message):
        template = {template!r}
        return template


class GPTBatcher:
    def __init__(self, api_key, system_prompt=""):
        self.system_prompt = system_prompt
'''
CODA_LM_REPO_TEMPLATE = "<<REF {{ }}>>\n{}\n<<END REF>>\n\n<<PRED>>\n{}\n<<END PRED>>"


def coda_lm_repo(root: Path) -> Path:
    """A folder in the layout of a CODA-LM clone's `evaluation/`, with placeholder prompts."""
    evaluation = root / "evaluation"
    evaluation.mkdir(parents=True)
    stages = [("stage1_eval_batch.py", 'SYSTEM-GENERAL "quoted"\nline two', "scene_few_shot"),
              ("stage2_eval_batch.py", "SYSTEM-SUGGESTION", "suggestion_few_shot")]
    for name, system, few_shot in stages:
        (evaluation / name).write_text(_STAGE_SCRIPT.format(system=system, few_shot=few_shot,
                                                            template=CODA_LM_REPO_TEMPLATE))
        (evaluation / few_shot).mkdir()
        for level in ("high", "low"):
            (evaluation / few_shot / f"{level}.json").write_text(json.dumps(
                {"reference": f"{few_shot} {level} reference", "prediction": f"{few_shot} {level} prediction",
                 "response": f"{few_shot} {level} response. So, Rating: [[{8 if level == 'high' else 2}]]."}))
    (evaluation / "stage3_eval_batch.py").write_text(_REGION_SCRIPT.format(
        system="SYSTEM-REGION", template=CODA_LM_REPO_TEMPLATE))
    return root


def coda_lm_scoring_case(folder: Path, rows: list[tuple], question: str = "Describe.") -> tuple[Path, Path]:
    """Predictions and CODA-LM references for the scorer: one (task, category or None, prediction)
    per row; the reference of row i is "reference i". Returns (predictions, references)."""
    from mose.data import Sample, write_jsonl

    refs = [Sample(id=f"c{i}", images=[], question=question, answer=f"reference {i}", task=task,
                   meta={"category": category} if category is not None else {})
            for i, (task, category, _) in enumerate(rows)]
    write_jsonl(folder / "refs.jsonl", refs)
    (folder / "pred.jsonl").write_text(
        "".join(json.dumps({"id": f"c{i}", "answer": p}) + "\n" for i, (*_, p) in enumerate(rows)))
    return folder / "pred.jsonl", folder / "refs.jsonl"
