"""CODA-LM as the official scripts do it: region classes and totals, requests built from a
(stand-in) clone of the CODA-LM repository, their rating rule, and `vqa_anno` keeping categories."""

import json

import pytest
from rich.console import Console

from fake_llm import FakeLLM
from formats import CODA_LM_REPO_TEMPLATE, coda_lm, coda_lm_repo, coda_lm_scoring_case, coda_lm_vqa
from mose.data import read_jsonl
from mose.data.loaders import convert_dataset
from mose.data.loaders.coda_lm import QUESTIONS
from mose.eval.coda_lm import REGION_WITH_LABELS, write_coda_lm_answers
from mose.eval.score import ScoreError, score, table
from mose.eval.score.coda_lm import CLASSES, JudgeSettings, region_class
from mose.eval.score.coda_lm_official import (
    CodaLmRepoError,
    UnparsableOfficialRating,
    load_official,
    parse_official_rating,
)

# The lists, as the official stage-3 script holds them.
OFFICIAL = {
    "vehicle": "car truck tram tricycle bus trailer construction_vehicle recreational_vehicle",
    "vru": "pedestrian cyclist bicycle moped motorcycle stroller wheelchair cart",
    "traffic_sign": "warning_sign traffic_sign",
    "traffic_light": "traffic_light",
    "traffic_cone": "traffic_cone",
    "barrier": "barrier bollard",
    "miscellaneous": "dog cat sentry_box traffic_box traffic_island debris suitcace dustbin concrete_block "
                     "machinery chair phone_booth basket cardboard carton garbage garbage_bag plastic_bag "
                     "stone tire misc",
}


@pytest.mark.parametrize("cls", list(OFFICIAL))
def test_every_official_name_is_in_its_class(cls):
    assert CLASSES == tuple(OFFICIAL)
    for name in OFFICIAL[cls].split():
        assert region_class(name) == cls, name


@pytest.mark.parametrize("name", ["van", "suitcase", "Car", "Traffic Cone", "traffic cones", "vehicles",
                                  "other objects", "", None])
def test_names_in_no_list_are_in_no_class(name):
    assert region_class(name) is None


def test_what_mose_used_to_map_elsewhere_follows_the_official_lists():
    assert [region_class(n) for n in ("bicycle", "moped", "motorcycle", "cart", "concrete_block")] == \
        ["vru", "vru", "vru", "vru", "miscellaneous"]


# ---------------------------------------------------------------- scoring through the fake endpoint

def rate_by_prediction(body):
    """Replies by a keyword at the start of the prediction in the last message."""
    last = body["messages"][-1]["content"]
    prediction = last.split("<<PRED>>\n")[1].split("\n<<END PRED>>")[0] if "<<PRED>>" in last else \
        last.split("[Assistant's answer begins]\n")[1].split("\n")[0]
    return {"R10": "Rating: [[10]]", "R9": "Rating: [[9]]", "R8": "Rating: [[8]]",
            "R6": "Good. Rating: [[6]] then Rating: [[1]]", "R4": "rating is: [[4]]", "R3": "so [[3]]",
            "R2": "Rating: [[2]]", "R11": "Rating: [[11]]", "HALF": "Rating: [[7.5]]",
            "NONE": "Fine overall."}[prediction.split()[0]]


@pytest.fixture
def server():
    fake = FakeLLM(respond=rate_by_prediction)
    yield fake
    fake.close()


def write_case(tmp_path, rows):
    return coda_lm_scoring_case(tmp_path, rows, question="q")


def options(server, **kw):
    return {"judge_model": "judge-x", "judge_base_url": server.url, "max_retries": 0, "backoff_s": 0.01,
            "workers": 2, **kw}


REGIONS = [  # category, prediction (its rating)
    ("car", "R8"), ("bicycle", "R6"), ("cart", "R4"), ("concrete_block", "R2"), ("suitcace", "R3"),
    ("van", "R10"), ("suitcase", "R9"), (None, "R9"), ("bollard", "NONE"),
]


def official_stage3(ratings):
    """The official stage-3 computation on (category, rating or None) pairs: per class, then all."""
    by_class = {cls: [r for c, r in ratings if c in names.split() and r is not None]
                for cls, names in OFFICIAL.items()}
    everything = [r for scores in by_class.values() for r in scores]
    return {c: sum(s) / len(s) if s else 0.0 for c, s in by_class.items()}, sum(everything) / len(everything)


@pytest.mark.parametrize("protocol", ["mose", "official"])
def test_region_classes_and_total_are_the_official_ones(tmp_path, server, protocol):
    rows = [("region_perception", c, p) for c, p in REGIONS]
    extra = {"protocol": protocol, "coda_lm_repo": coda_lm_repo(tmp_path / "clone")} \
        if protocol == "official" else {}
    result = score("coda-lm", *write_case(tmp_path, rows), **options(server, **extra))
    region = result["region"]
    # official rule: "R6" → the first Rating: 6; mose's rule: the last → 1
    rating = {"R6": 6 if protocol == "official" else 1}
    ratings = [(c, rating.get(p, int(p[1:])) if p != "NONE" else None) for c, p in REGIONS]
    by_class, total = official_stage3(ratings)
    assert region["score"] == pytest.approx(total, abs=1e-4)  # (8 + 6 + 4 + 2 + 3) / 5 officially
    for cls, value in by_class.items():
        cell = region["by_class"][cls]
        assert (cell["score"] or 0.0) == pytest.approx(value, abs=1e-4), cls
    assert (region["n"], region["failed"]) == (6, 1)  # the bollard's reply had no rating
    assert region["by_class"]["barrier"] == {"score": None, "score_x10": None, "n": 1, "failed": 1}
    unlisted = region["unlisted"]
    assert unlisted["names"] == {"<no category>": 1, "suitcase": 1, "van": 1}
    assert (unlisted["n"], unlisted["failed"], unlisted["score"]) == (3, 0, pytest.approx(28 / 3, abs=1e-3))
    inclusive = region["inclusive"]  # mose's total over all nine, labelled as such
    assert inclusive["n"] == 9 and "not the official" in inclusive["note"]
    assert inclusive["score"] == pytest.approx(
        sum(r for _, r in ratings if r is not None) / 8, abs=1e-3)
    assert result["judge"]["protocol"] == protocol and result["judge"]["model"] == "judge-x"
    text = render(table("coda-lm", result))
    assert f"CODA-LM (LLM judge judge-x, protocol {protocol})" in text
    assert "unlisted (in no class, not scored)" in text and "all regions (mose, inclusive)" in text
    assert "van ×1" in table("coda-lm", result).caption


# ---------------------------------------------------------------- protocol official: the requests

TEMPLATE = CODA_LM_REPO_TEMPLATE.replace("{{ }}", "{ }")  # what str.format makes of it


def fill(reference, prediction):
    first, second, third = TEMPLATE.split("{}")
    return f"{first}{reference}{second}{prediction}{third}"


def test_requests_are_built_verbatim_from_the_clone(tmp_path, server):
    repo = coda_lm_repo(tmp_path / "clone")
    rows = [("general_perception", None, "R8 general"), ("driving_suggestion", None, "R4 suggestion"),
            ("region_perception", "car", "R11 region")]
    result = score("coda-lm", *write_case(tmp_path, rows),
                         **options(server, protocol="official", coda_lm_repo=repo))
    bodies = {body["messages"][0]["content"]: body for body in server.requests}
    assert len(server.requests) == 3
    for body in server.requests:  # what the official scripts send, nothing more
        assert set(body) == {"model", "messages", "temperature"}
        assert body["temperature"] == 0 and isinstance(body["temperature"], int)
    general = bodies['SYSTEM-GENERAL "quoted"\nline two']["messages"]
    assert general == [
        {"role": "system", "content": 'SYSTEM-GENERAL "quoted"\nline two'},
        {"role": "user", "content": fill("scene_few_shot high reference", "scene_few_shot high prediction")},
        {"role": "assistant", "content": "scene_few_shot high response. So, Rating: [[8]]."},
        {"role": "user", "content": fill("scene_few_shot low reference", "scene_few_shot low prediction")},
        {"role": "assistant", "content": "scene_few_shot low response. So, Rating: [[2]]."},
        {"role": "user", "content": fill("reference 0", "R8 general")},
    ]
    suggestion = bodies["SYSTEM-SUGGESTION"]["messages"]
    assert [m["content"] for m in suggestion[1:5]] == [
        fill("suggestion_few_shot high reference", "suggestion_few_shot high prediction"),
        "suggestion_few_shot high response. So, Rating: [[8]].",
        fill("suggestion_few_shot low reference", "suggestion_few_shot low prediction"),
        "suggestion_few_shot low response. So, Rating: [[2]]."]
    assert suggestion[-1] == {"role": "user", "content": fill("reference 1", "R4 suggestion")}
    assert bodies["SYSTEM-REGION"]["messages"] == [  # stage 3 is zero-shot
        {"role": "system", "content": "SYSTEM-REGION"},
        {"role": "user", "content": fill("reference 2", "R11 region")}]
    # "rating is: [[4]]" is the scripts' second rule; 11 is kept as they keep it, and counted
    assert (result["general"]["score"], result["suggestion"]["score"]) == (8.0, 4.0)
    assert (result["region"]["score"], result["region"]["outside_1_10"]) == (11.0, 1)
    info = result["judge"]
    assert info["coda_lm_repo"] == str(repo) and set(info["sources"]) == {
        "evaluation/stage1_eval_batch.py", "evaluation/stage2_eval_batch.py",
        "evaluation/stage3_eval_batch.py",
        "evaluation/scene_few_shot/high.json", "evaluation/scene_few_shot/low.json",
        "evaluation/suggestion_few_shot/high.json", "evaluation/suggestion_few_shot/low.json"}
    caption = table("coda-lm", result).caption
    assert f"protocol official, prompts from {repo}" in caption and "1 rating(s) outside 1..10" in caption
    # the evaluation folder itself will do too, and gives the same requests (all from the cache)
    again = score("coda-lm", *write_case(tmp_path, rows),
                        **options(server, protocol="official", coda_lm_repo=repo / "evaluation"))
    assert len(server.requests) == 3 and again["judge"]["cached"] == 3
    assert again["region"] == result["region"]


def test_official_replies_are_asked_once_and_what_the_scripts_drop_is_counted(tmp_path, server):
    rows = [("general_perception", None, "HALF"), ("general_perception", None, "NONE"),
            ("general_perception", None, "R3"), ("driving_suggestion", None, "R6")]
    result = score("coda-lm", *write_case(tmp_path, rows),
                         **options(server, protocol="official", coda_lm_repo=coda_lm_repo(tmp_path / "r")))
    assert len(server.requests) == 4  # no second ask for the unparsable ones
    general = result["general"]
    assert (general["score"], general["n"], general["failed"]) == (3.0, 3, 2)
    assert all("unparsable" in f["reason"] for f in general["failures"])
    assert result["suggestion"]["score"] == 6.0  # the first "Rating: [[n]]", not the last
    # under protocol mose the same replies parse by mose's rule (7.5 is a rating there)
    mose = score("coda-lm", *write_case(tmp_path, rows), **options(server))
    assert mose["general"]["score"] == pytest.approx((7.5 + 3) / 2) and mose["suggestion"]["score"] == 1.0


@pytest.mark.parametrize("reply, rating", [
    ("Rating: [[7]]", 7), ("Rating: [[ 8 ]]", 8), ("Rating: [[6]] and later Rating: [[2]]", 6),
    ("so [[2]] but Rating: [[9]]", 9), ("The rating is: [[5]]", 5), ("[[4]] then [[9]]", 4),
    ("Rating: [[11]]", 11), ("Rating: [[0]]", 0),
])
def test_the_official_rating_rule(reply, rating):
    assert parse_official_rating(reply) == rating and isinstance(parse_official_rating(reply), int)


@pytest.mark.parametrize("reply", ["Rating: [[7.5]]", "Rating: 7", "[[seven]]", "Rating: [[x]] and [[4]]",
                                   ""])
def test_what_the_official_rule_drops(reply):
    with pytest.raises(UnparsableOfficialRating):
        parse_official_rating(reply)


# ---------------------------------------------------------------- a folder that is not a clone

def test_a_wrong_folder_is_named_with_the_missing_file(tmp_path):
    with pytest.raises(CodaLmRepoError, match=r"coda_lm_repo .*nowhere: not a folder"):
        load_official(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodaLmRepoError,
                       match=r"empty: missing evaluation/stage1_eval_batch.py .*DLUT-LYZ/CODA-LM"):
        load_official(tmp_path / "empty")
    repo = coda_lm_repo(tmp_path / "a")
    (repo / "evaluation" / "stage2_eval_batch.py").unlink()
    with pytest.raises(CodaLmRepoError, match=r"a: missing evaluation/stage2_eval_batch.py"):
        load_official(repo)
    repo = coda_lm_repo(tmp_path / "b")
    (repo / "evaluation" / "suggestion_few_shot" / "low.json").unlink()
    with pytest.raises(CodaLmRepoError, match=r"b: missing evaluation/suggestion_few_shot/low.json "
                                              r"\(a few-shot example stage2_eval_batch.py sends\)"):
        load_official(repo)
    repo = coda_lm_repo(tmp_path / "c")
    (repo / "evaluation" / "stage3_eval_batch.py").write_text("template = '{} {}'\n")
    with pytest.raises(CodaLmRepoError, match=r"stage3_eval_batch.py: no a string assigned to "
                                              r"`self.system_prompt` found"):
        load_official(repo)
    repo = coda_lm_repo(tmp_path / "d")
    (repo / "evaluation" / "scene_few_shot" / "high.json").write_text('{"reference": "r", "prediction": "p"}')
    with pytest.raises(CodaLmRepoError, match=r"high.json, field 'response': expected a string"):
        load_official(repo)


def test_protocol_settings_are_checked(tmp_path, server):
    with pytest.raises(ValueError, match="protocol official .* give coda_lm_repo"):
        JudgeSettings("m", "http://x", protocol="official")
    with pytest.raises(ValueError, match="read by protocol official only"):
        JudgeSettings("m", "http://x", coda_lm_repo=tmp_path)
    with pytest.raises(ValueError, match="judge protocol 'gpt'"):
        JudgeSettings("m", "http://x", protocol="gpt")
    rows = [("general_perception", None, "R8")]
    with pytest.raises(ScoreError, match="missing evaluation/stage1_eval_batch.py"):  # before any request
        score("coda-lm", *write_case(tmp_path, rows),
                    **options(server, protocol="official", coda_lm_repo=tmp_path))
    assert server.requests == []


# ---------------------------------------------------------------- vqa_anno keeps the categories

def test_both_source_formats_write_the_same_w_label_file(tmp_path):
    split, images = coda_lm(tmp_path)
    from_files = tmp_path / "files.jsonl"
    convert_dataset("coda-lm", split, from_files, images)
    coda_lm_vqa(split, images, QUESTIONS)  # the same questions, so the answer files can be equal
    from_vqa = tmp_path / "vqa.jsonl"
    report = convert_dataset("coda-lm", split, from_vqa, images)
    assert dict(report.tasks) == {"general_perception": 1, "region_perception": 2, "driving_suggestion": 1}
    vqa = {s.id: s for s in read_jsonl(from_vqa)}
    region = vqa["coda/vqa/region_perception/0"]
    assert region.meta == {"source": "coda-lm", "question_id": 0, "file": "test_0001.json",
                           "image": "test/images_w_boxes/0001_object_1.jpg", "region": "1",
                           "category": "pedestrian", "box": [10.0, 8.0, 12.5, 20.0]}
    assert vqa["coda/vqa/region_perception/1"].meta["category"] == "traffic_cone"

    def answers(path, out):
        samples = list(read_jsonl(path))
        region_key = {s.id: s.meta.get("region") or s.id.rsplit("/", 1)[-1] for s in samples}
        predictions = [{"id": s.id, "answer": f"{s.task} {region_key[s.id] if 'region' in s.task else ''}"}
                       for s in samples]
        names = {p.name for p in write_coda_lm_answers(
            {p["id"]: _prediction(p) for p in predictions}, samples, out)}
        assert REGION_WITH_LABELS in names
        return {name: (out / name).read_text() for name in names}

    assert answers(from_files, tmp_path / "a") == answers(from_vqa, tmp_path / "b")
    labelled = [json.loads(line) for line in (tmp_path / "b" / REGION_WITH_LABELS).read_text().splitlines()]
    assert [(r["question_id"], r["image"], r["label_name"]) for r in labelled] == [
        (0, "test/images_w_boxes/0001_object_1.jpg", "pedestrian"),
        (1, "test/images_w_boxes/0001_object_2.jpg", "traffic_cone")]


def test_vqa_rows_that_do_not_match_the_annotations_are_explained(tmp_path):
    split, images = coda_lm(tmp_path)
    folder = coda_lm_vqa(split, images, QUESTIONS)
    rows = (folder / "region_perception.jsonl").read_text().splitlines()
    wrong = json.loads(rows[1]) | {"image": "test/images_w_boxes/0001_object_9.jpg"}
    (images / wrong["image"]).write_bytes((images / "test/images_w_boxes/0001_object_1.jpg").read_bytes())
    (folder / "region_perception.jsonl").write_text(rows[0] + "\n" + json.dumps(wrong) + "\n")
    with pytest.raises(Exception, match="test_0001.json has no region_perception region '9'"):
        convert_dataset("coda-lm", split, tmp_path / "o.jsonl", images)
    other = json.loads(rows[0]) | {"answer": "something else"}
    (folder / "region_perception.jsonl").write_text(json.dumps(other) + "\n")
    with pytest.raises(Exception, match="differs from region 1 of test_0001.json"):
        convert_dataset("coda-lm", split, tmp_path / "o.jsonl", images)


def _prediction(row):
    from mose.eval.predictions import Prediction

    return Prediction(id=row["id"], answer=row["answer"], skill_chain=None)


def render(renderable):
    console = Console(record=True, width=140)
    console.print(renderable)
    return console.export_text()
