"""Sample records, JSONL files, the procedural world and the rule annotator."""

import json
from pathlib import Path

import pytest

from mose.data import DataError, Sample, read_jsonl, write_jsonl
from mose.data.world import generate
from mose.skills.rules import RuleAnnotator

GOOD = {"id": "a/1", "images": ["img/1.png"], "question": "q?", "answer": "yes",
        "task": "vqa", "choices": ["yes", "no"], "correct": 0,
        "skills": {"perception": "vru"}, "meta": {"box": [1.0, 2.0, 3.0, 4.0]}}


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_records_round_trip_with_paths_relative_to_the_file(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    (sample,) = read_jsonl(path)
    assert sample.images == [str(tmp_path / "img/1.png")]
    write_jsonl(tmp_path / "copy.jsonl", [sample])
    written = json.loads((tmp_path / "copy.jsonl").read_text())
    assert written == GOOD
    assert list(written) == ["id", "images", "question", "answer", "task", "choices", "correct",
                             "skills", "meta"]


@pytest.mark.parametrize("change, field, message", [
    ({"correct": 2}, "correct", "0-based index into 2 choices"),
    ({"choices": "yes|no"}, "choices", "a list of strings"),
    ({"question": None}, "question", "a string"),
    ({"skills": {"perception": 3}}, "skills", "{level: skill}"),
    ({"extra": 1}, "extra", "source metadata belongs in `meta`"),
])
def test_bad_records_name_file_record_and_field(tmp_path, change, field, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "id": "a/2", **change}])
    with pytest.raises(DataError) as error:
        list(read_jsonl(path))
    text = str(error.value)
    assert str(path) in text and "record a/2" in text and f"field {field!r}" in text
    assert message in text


def test_malformed_json_names_the_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl, record at line 2: malformed JSON"):
        list(read_jsonl(path))


def test_interrupted_write_leaves_no_file(tmp_path):
    def samples():
        yield Sample.from_dict(GOOD)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(tmp_path / "out.jsonl", samples())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("domain", ["driving", "robot"])
def test_world_is_deterministic_and_splits_never_share_a_scene(tmp_path, domain):
    first = generate(domain, 40, seed=5, out=tmp_path / "a")
    again = generate(domain, 40, seed=5, out=tmp_path / "b")
    test = generate(domain, 40, seed=5, out=tmp_path / "a", split="test")
    assert first.read_text().replace("/a/", "/") == again.read_text().replace("/b/", "/")
    images = lambda path: {(path.parent / s).read_bytes() for s in  # noqa: E731
                           [json.loads(line)["images"][0] for line in path.read_text().splitlines()]}
    assert images(first) == images(again)
    assert not images(first) & images(test)
    samples = list(read_jsonl(first))
    assert all(s.skills and s.answer for s in samples)
    if domain == "robot":
        assert {len(s.choices) for s in samples} == {4, 5}
        assert all(s.choices[s.correct] == s.answer for s in samples)
        assert any(s.answer == "None of the above" for s in samples)


def test_world_weights_make_a_skill_rare(tmp_path):
    common = list(read_jsonl(generate("driving", 300, 0, tmp_path / "c")))
    rare = list(read_jsonl(generate("driving", 300, 0, tmp_path / "r",
                                    weights={"pedestrian": 0.02, "cyclist": 0.02})))
    vru = lambda samples: sum(s.skills["perception"] == "vru" for s in samples)  # noqa: E731
    assert vru(rare) * 5 < vru(common)
    with pytest.raises(ValueError, match="unknown weight key"):
        generate("driving", 3, 0, tmp_path / "x", weights={"unicorn": 1})


def test_world_plans_follow_from_perception_and_prediction(tmp_path):
    samples = [s for s in read_jsonl(generate("driving", 400, 1, tmp_path)) if s.task == "planning"]
    for s in samples:
        if s.meta["category"] == "traffic light":
            assert s.answer == ("stop" if s.meta["light"] == "red" else "keep lane")
        elif s.meta["lane"].endswith("sidewalk") and s.meta["motion"] != "crossing":
            assert s.answer == "keep lane"
        elif s.skills["perception"] == "vru" and (s.meta["lane"] == "ego lane"
                                                  or s.meta["motion"] == "crossing"):
            assert s.answer == ("stop" if s.meta["distance"] == "near" else "slow down and yield")
    assert len({s.answer for s in samples}) == 4


@pytest.mark.parametrize("domain", ["driving", "robot"])
def test_rules_recover_the_worlds_ground_truth_skills(tmp_path, domain):
    samples = list(read_jsonl(generate(domain, 1500, seed=11, out=tmp_path)))
    labelled, coverage = RuleAnnotator.load(f"world-{domain}").annotate(samples)
    assert [s.skills for s in labelled] == [s.skills for s in samples]
    assert coverage.total == 1500 and sum(coverage.by_rule.values()) > 1500


@pytest.mark.parametrize("text, message", [
    ("rules: [{name: x, level: flying, skill: a}]", "unknown level 'flying'"),
    ("rules: [{name: x, level: perception, skill: unicorn}]", "unknown skill 'unicorn'"),
    ("rules: [{name: x, level: perception, skill: vru, map: {a: vru}}]", "either `skill`"),
    ("rules: [{name: x, level: perception, skill: vru, when: {question: {near: 3}}}]",
     "unknown condition 'near'"),
    ("rules: 3", "expected `taxonomy"),
])
def test_bad_rule_files_say_which_rule(tmp_path, text, message):
    path = tmp_path / "rules.yaml"
    path.write_text("taxonomy: driving\n" + text + "\n")
    with pytest.raises(ValueError, match=message):
        RuleAnnotator.load(path)


def test_rule_conditions_match_words_not_substrings(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "taxonomy: driving\nrules:\n"
        "  - {name: car, level: perception, skill: vehicle, when: {question: {any: [car]}}}\n"
        "  - {name: meta, level: planning, field: meta.act, map: {halt: stop}}\n")
    annotator = RuleAnnotator.load(path)
    skills, decided_by = annotator.label(Sample(id="1", images=[], question="Is the CAR moving?",
                                                meta={"act": "Halt"}))
    assert skills == {"perception": "vehicle", "prediction": "general", "planning": "stop"}
    assert decided_by == {"perception": "car", "planning": "meta"}
    skills, _ = annotator.label(Sample(id="2", images=[], question="Is the carpet red?"))
    assert skills["perception"] == "general"


def test_relative_paths_survive_a_read_and_a_write_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate("robot", 3, seed=0, out="runs/world")  # a relative folder, as the README commands use
    samples = list(read_jsonl("runs/world/train.jsonl"))
    assert all(Path(s.images[0]).is_absolute() for s in samples)
    write_jsonl("runs/labelled/subset.jsonl", samples)  # another folder than the images'
    again = list(read_jsonl("runs/labelled/subset.jsonl"))
    assert all(Path(s.images[0]).is_file() for s in again)
