"""Loaders read the public formats exactly, and say clearly what is wrong."""

import json

import pytest
from PIL import Image

from formats import coda_lm, coda_lm_old, drivelm, jpeg, robo2vlm
from mose.data import DataError, read_jsonl
from mose.data.loaders import convert_dataset
from mose.data.loaders.robo2vlm import parse_choices
from mose.skills.rules import RuleAnnotator


def test_coda_lm_gives_three_tasks_and_boxed_region_images(tmp_path):
    split, images = coda_lm(tmp_path)
    out = tmp_path / "out" / "coda.jsonl"
    report = convert_dataset("coda-lm", split, out, images)
    assert dict(report.tasks) == {"general_perception": 1, "region_perception": 2,
                                  "driving_suggestion": 1}
    samples = {s.id: s for s in read_jsonl(out)}
    general = samples["coda/test_0001/general"]
    assert general.answer == "A truck and cones narrow the lane ahead."
    assert general.meta["objects"]["traffic cones"] == 1
    region = samples["coda/test_0001/region/1"]
    assert region.meta["box"] == [10.0, 8.0, 12.5, 20.0] and region.meta["category"] == "pedestrian"
    with Image.open(region.images[0]) as boxed:
        edge = boxed.convert("RGB").getpixel((10, 18))  # on the left side of the rectangle
    assert edge[0] > 180 and edge[1] < 90 and edge[2] < 90  # red (JPEG-tolerant)
    assert samples["coda/test_0001/suggestion"].images[0].endswith("test/images/0001.jpg")
    labelled, _ = RuleAnnotator.load("coda-lm").annotate(samples.values())
    skills = {s.id: s.skills for s in labelled}
    assert skills["coda/test_0001/region/1"]["perception"] == "vru"
    assert skills["coda/test_0001/region/2"]["perception"] == "obstacle"
    assert skills["coda/test_0001/suggestion"]["planning"] == "steer_around"


def test_coda_lm_vqa_anno_form(tmp_path):
    split = tmp_path / "Test"
    jpeg(split / "images" / "0001.jpg")
    (split / "vqa_anno").mkdir()
    (split / "vqa_anno" / "region_perception.jsonl").write_text(json.dumps(
        {"question_id": 7, "image": "images/0001.jpg", "question": "Describe the object."}) + "\n")
    out = tmp_path / "o.jsonl"
    assert dict(convert_dataset("coda-lm", split, out).tasks) == {"region_perception": 1}
    (sample,) = read_jsonl(out)
    assert sample.answer is None and sample.meta["question_id"] == 7


def test_coda_lm_old_release_and_missing_images_are_explained(tmp_path):
    with pytest.raises(DataError, match="old CODA-LM release"):
        convert_dataset("coda-lm", coda_lm_old(tmp_path), tmp_path / "o.jsonl", tmp_path)
    split, _ = coda_lm(tmp_path / "x")
    with pytest.raises(DataError, match=r"test_0001.json, record test_0001, field 'image': missing image"):
        convert_dataset("coda-lm", split, tmp_path / "o.jsonl", tmp_path / "nowhere")
    assert not (tmp_path / "o.jsonl").exists()


def test_choices_parse_as_json_or_python_literal():
    assert parse_choices('["a", "b"]') == ["a", "b"]
    assert parse_choices("['a', \"b's\"]") == ["a", "b's"]
    assert parse_choices("a, b") is None and parse_choices("[1, 2]") is None


def test_robo2vlm_shards_with_both_serialisations_and_embedded_images(tmp_path):
    shard = robo2vlm(tmp_path / "robo" / "test-00000.parquet")
    out = tmp_path / "out" / "robo.jsonl"
    report = convert_dataset("robo2vlm", shard.parent, out)
    assert report.tasks == {"robo2vlm": 2}
    first, second = read_jsonl(out)
    assert (first.choices[first.correct], len(first.choices)) == ("No", 4)
    assert second.answer == "None of the above" and len(second.choices) == 5
    assert Image.open(first.images[0]).size == (32, 32)
    labelled, _ = RuleAnnotator.load("robo2vlm").annotate([first, second])
    assert labelled[0].skills["perception"] == "gripper"
    assert labelled[1].skills["perception"] == "spatial"


def test_robo2vlm_bad_rows_stop_or_are_skipped_and_counted(tmp_path):
    rows = [{"id": "ok", "question": "q", "choices": '["a", "b", "c", "d"]', "correct_answer": 0},
            {"id": "bad-choices", "question": "q", "choices": "a or b", "correct_answer": 0},
            {"id": "bad-index", "question": "q", "choices": '["a", "b"]', "correct_answer": 2}]
    shard = robo2vlm(tmp_path / "s.parquet", rows)
    with pytest.raises(DataError, match="record bad-choices, field 'choices'"):
        convert_dataset("robo2vlm", shard, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    report = convert_dataset("robo2vlm", shard, tmp_path / "o.jsonl", skip_bad=True)
    assert report.written == 1 and len(report.skipped) == 2
    assert "record bad-index, field 'correct_answer'" in report.skipped[1]


def test_drivelm_stages_become_tasks_and_rules_levels(tmp_path):
    path, nuscenes = drivelm(tmp_path)
    out = tmp_path / "d.jsonl"
    report = convert_dataset("drivelm", path, out, nuscenes)
    assert dict(report.tasks) == {"perception": 1, "prediction": 1, "planning": 1, "behavior": 1}
    samples = list(read_jsonl(out))
    assert all(len(s.images) == 2 and all(p.endswith(".jpg") for p in s.images) for s in samples)
    labelled, _ = RuleAnnotator.load("drivelm").annotate(samples)
    by_task = {s.task: s.skills for s in labelled}
    assert by_task["perception"]["perception"] == "vru"
    assert by_task["prediction"]["prediction"] == "crossing"
    assert by_task["planning"]["planning"] == "yield"
    with pytest.raises(DataError, match="missing image"):
        convert_dataset("drivelm", path, out, tmp_path / "elsewhere")


def test_generic_jsonl_checks_images(tmp_path):
    jpeg(tmp_path / "a.jpg")
    record = {"id": "1", "images": ["a.jpg"], "question": "q", "answer": "a"}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(
        {**record, "id": "2", "images": ["gone.jpg"]}) + "\n")
    with pytest.raises(DataError, match="record 2, field 'images': missing image"):
        convert_dataset("jsonl", tmp_path / "in.jsonl", tmp_path / "out" / "o.jsonl")
    report = convert_dataset("jsonl", tmp_path / "in.jsonl", tmp_path / "o.jsonl", skip_bad=True)
    assert report.written == 1
    assert json.loads((tmp_path / "o.jsonl").read_text())["images"] == ["a.jpg"]
