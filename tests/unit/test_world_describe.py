"""The driving world's `describe` kind: off unless a weight asks for it, canonical when on."""

from mose.data import read_jsonl
from mose.data.world import generate
from mose.data.world.driving import QUESTION_KINDS, Thing, describe


def test_describe_is_off_by_default(tmp_path):
    samples = list(read_jsonl(generate("driving", 300, seed=3, out=tmp_path)))
    assert not any(s.meta["question_kind"] == "describe" for s in samples)
    assert {s.meta["question_kind"] for s in samples} == set(QUESTION_KINDS) - {"describe"}


def test_a_weight_switches_describe_on(tmp_path):
    samples = list(read_jsonl(generate("driving", 200, seed=3, out=tmp_path, weights={"describe": 1})))
    described = [s for s in samples if s.meta["question_kind"] == "describe"]
    assert 0 < len(described) < len(samples)  # one kind among the others, at weight 1
    for sample in described:
        assert sample.question == "Describe the scene." and sample.task == "description"
        assert sample.meta["category"] in sample.answer and sample.meta["motion"] in sample.answer
        assert sample.skills["perception"] != "general" and sample.skills["planning"] == "general"


def test_describe_alone_and_the_other_kinds_unchanged(tmp_path):
    weights = {kind: 0 for kind in QUESTION_KINDS} | {"describe": 1}
    only = list(read_jsonl(generate("driving", 20, seed=5, out=tmp_path / "d", weights=weights)))
    assert {s.meta["question_kind"] for s in only} == {"describe"}
    # Switching describe off explicitly draws exactly the default data set.
    default = (tmp_path / "a", {}), (tmp_path / "b", {"describe": 0})
    texts = [generate("driving", 50, seed=5, out=out, weights=w).read_text() for out, w in default]
    assert texts[0] == texts[1]


def test_descriptions_list_objects_nearest_first():
    far = Thing("car", "left lane", 20.0, "oncoming")
    near = Thing("cyclist", "right sidewalk", 80.0, "crossing")
    light = Thing("traffic light", "left sidewalk", 30.0, "stationary", light="red")
    assert describe([far, near]) == ("a cyclist on the right sidewalk, near, crossing; "
                                     "a car in the left lane, far, oncoming.")
    assert describe([light]) == "a red traffic light on the left sidewalk, far, stationary."
