"""The CODA-LM judge against a real chat server on loopback: good, malformed, failing and slow
replies, the on-disk cache, and scores worked out by hand."""

import re
import time

import pytest
from rich.console import Console

from fake_llm import FakeLLM, Reply
from formats import coda_lm_scoring_case
from mose.endpoint import EndpointError
from mose.eval.score import ScoreError, score, table
from mose.eval.score.coda_lm import UnparsableRating, judge_messages, parse_rating, region_class

PREDICTION = re.compile(r"\[Assistant's answer begins\]\n(.*)\n\[Assistant's answer ends\]", re.S)


def judge_reply(body):
    """Rates by a keyword in the prediction of the last message (not in the few-shot examples)."""
    prediction = PREDICTION.search(body["messages"][-1]["content"]).group(1)
    for word, reply in [("GOOD", "Matches the reference.\nRating: [[8]]"), ("DECIMAL", "Rating: [[7.5]]"),
                        ("BARE", "Fair, so [[6]]"), ("LOW", "Invented objects. Rating: [[2]]"),
                        ("MALFORMED", "Quite good overall."), ("ELEVEN", "Rating: [[11]]"),
                        ("FAIL", Reply(status=500)), ("TIMEOUT", Reply("Rating: [[9]]", delay_s=0.8)),
                        ("DELAYED", Reply("Rating: [[5]]", delay_s=0.25)), ("DENIED", Reply(status=401))]:
        if word in prediction:
            return reply
    return "Rating: [[3]]"


@pytest.fixture
def server():
    fake = FakeLLM(respond=judge_reply)
    yield fake
    fake.close()


# (task, category, prediction)
ROWS = [
    ("general_perception", None, "GOOD"), ("general_perception", None, "DECIMAL"),
    ("region_perception", "car", "GOOD"), ("region_perception", "traffic_cone", "BARE"),
    ("region_perception", "pedestrian", "LOW"), ("region_perception", "bollard", "MALFORMED"),
    ("driving_suggestion", None, "GOOD"), ("driving_suggestion", None, "FAIL"),
]


def write_case(tmp_path, rows=ROWS):
    return coda_lm_scoring_case(tmp_path, rows)


def options(server, **kw):
    return {"judge_model": "judge-x", "judge_base_url": server.url, "max_retries": 1, "backoff_s": 0.01,
            "workers": 4, **kw}


def test_scores_failures_and_classes_by_hand(tmp_path, server):
    result = score("coda-lm", *write_case(tmp_path), **options(server))
    assert result["general"] | {"failures": []} == {"score": 7.75, "score_x10": 77.5, "n": 2, "failed": 0,
                                                    "failures": []}
    region = result["region"]  # 8, 6, 2 and one unparsable reply: (8 + 6 + 2) / 3
    assert (region["score"], region["n"], region["failed"]) == (pytest.approx(16 / 3, abs=1e-3), 4, 1)
    assert region["failures"][0]["id"] == "c5" and "unparsable" in region["failures"][0]["reason"]
    assert region["by_class"]["vehicle"] == {"score": 8.0, "score_x10": 80.0, "n": 1, "failed": 0}
    assert region["by_class"]["traffic_cone"]["score"] == 6.0
    assert region["by_class"]["vru"]["score"] == 2.0
    assert region["by_class"]["barrier"] == {"score": None, "score_x10": None, "n": 1, "failed": 1}
    assert region["by_class"]["traffic_light"]["n"] == 0
    suggestion = result["suggestion"]  # the HTTP 500 one failed after its retry
    assert (suggestion["score"], suggestion["failed"]) == (8.0, 1)
    assert "no answer after 2 tries" in suggestion["failures"][0]["reason"]
    assert result["average"]["score"] == pytest.approx((7.75 + 16 / 3 + 8) / 3, abs=1e-3)
    # one request each, the malformed reply asked twice (parse retry), the 500 twice (retry)
    assert len(server.requests) == 10 and result["judge"]["asked"] == 8
    assert all(r["temperature"] == 0 and r["model"] == "judge-x" for r in server.requests)
    text = render(table("coda-lm", result))
    assert "region: barrier" in text and "8 asked" in text

    again = score("coda-lm", *write_case(tmp_path), **options(server))  # only the failures are asked
    assert result["judge"] == {"model": "judge-x", "protocol": "mose", "asked": 8, "cached": 0}
    assert again == result | {"judge": {"model": "judge-x", "protocol": "mose", "asked": 2, "cached": 6}}
    assert len(server.requests) == 14


def test_a_rerun_makes_no_request_and_a_torn_cache_line_is_asked_again(tmp_path, server):
    rows = [("general_perception", None, "GOOD"), ("region_perception", "car", "DECIMAL"),
            ("driving_suggestion", None, "BARE")]
    first = score("coda-lm", *write_case(tmp_path, rows), **options(server, cache_dir=tmp_path / "cache"))
    assert len(server.requests) == 3
    second = score("coda-lm", *write_case(tmp_path, rows), **options(server, cache_dir=tmp_path / "cache"))
    assert len(server.requests) == 3
    assert second["judge"] == {"model": "judge-x", "protocol": "mose", "asked": 0, "cached": 3}
    assert second == first | {"judge": second["judge"]}
    cache = tmp_path / "cache" / "judgments.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # an interrupted write
    third = score("coda-lm", *write_case(tmp_path, rows), **options(server, cache_dir=tmp_path / "cache"))
    assert len(server.requests) == 4 and third["judge"]["asked"] == 1
    assert third["average"] == first["average"]


def test_the_cache_is_keyed_by_judge_model(tmp_path, server):
    rows = [("general_perception", None, "GOOD")]
    score("coda-lm", *write_case(tmp_path, rows), **options(server))
    score("coda-lm", *write_case(tmp_path, rows), **options(server, judge_model="judge-y"))
    assert [r["model"] for r in server.requests] == ["judge-x", "judge-y"]
    assert (tmp_path / "judge-cache" / "judgments.jsonl").is_file()  # default: beside the predictions


def test_slow_replies_time_out_and_fail_and_workers_run_in_parallel(tmp_path, server):
    rows = [("general_perception", None, "TIMEOUT"), *[("driving_suggestion", None, f"DELAYED {i}")
                                                     for i in range(4)]]
    start = time.monotonic()
    result = score("coda-lm", *write_case(tmp_path, rows), **options(server, timeout_s=0.5, max_retries=0))
    assert time.monotonic() - start < 2.5
    assert result["general"]["failed"] == 1 and "no answer after 1 tries" in result["general"]["failures"][0][
        "reason"]
    assert (result["suggestion"]["score"], result["suggestion"]["failed"]) == (5.0, 0)
    assert server.max_in_flight >= 2


def test_wrong_settings_stop_at_once(tmp_path, server):
    with pytest.raises(EndpointError, match="401"):
        score("coda-lm", *write_case(tmp_path, [("general_perception", None, "DENIED")]), **options(server))
    rows = [("general_perception", None, f"FAIL {i}") for i in range(6)]
    with pytest.raises(EndpointError, match="3 judgments in a row failed .* rerun to resume"):
        score("coda-lm", *write_case(tmp_path, rows), **options(server, abort_after=3, max_retries=0,
                                                                 workers=1))
    with pytest.raises(ScoreError, match="judge model and its base URL"):
        score("coda-lm", *write_case(tmp_path), judge_model=None, judge_base_url=None)
    bad = [("vqa", None, "GOOD")]
    with pytest.raises(ScoreError, match="reference 'c0', field 'task': 'vqa' is not a CODA-LM task"):
        score("coda-lm", *write_case(tmp_path, bad), **options(server))


@pytest.mark.parametrize("reply, rating", [
    ("Good.\nRating: [[7]]", 7.0), ("Rating: [[7.5]]", 7.5), ("rating:[[ 10 ]]", 10.0), ("so [[6]]", 6.0),
    ("[[3]] at first, then Rating: [[8]]", 8.0), ("Rating: [[1]]", 1.0),
])
def test_parse_rating(reply, rating):
    assert parse_rating(reply) == rating


@pytest.mark.parametrize("reply", ["Rating: 7", "Rating: [[11]]", "Rating: [[0]]", "[[seven]]", ""])
def test_unparsable_ratings(reply):
    with pytest.raises(UnparsableRating):
        parse_rating(reply)


def test_prompts_mark_reference_and_prediction_and_few_shot_only_where_due():
    general = judge_messages("general", "REF TEXT", "PRED TEXT")
    assert [m["role"] for m in general] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "hallucination" in general[0]["content"].lower() and "Rating: [[n]]" in general[0]["content"]
    assert general[-1]["content"] == ("[Reference begins]\nREF TEXT\n[Reference ends]\n\n"
                                      "[Assistant's answer begins]\nPRED TEXT\n[Assistant's answer ends]")
    ratings = [parse_rating(m["content"]) for m in general if m["role"] == "assistant"]
    assert max(ratings) >= 8 and min(ratings) <= 2  # one high, one low example
    suggestion = judge_messages("suggestion", "r", "p")
    assert "rationality" in suggestion[0]["content"].lower() and len(suggestion) == 6
    assert [m["role"] for m in judge_messages("region", "r", "p")] == ["system", "user"]  # zero-shot


@pytest.mark.parametrize("category, cls", [
    ("car", "vehicle"), ("pedestrian", "vru"), ("bicycle", "vru"), ("cart", "vru"),
    ("warning_sign", "traffic_sign"), ("traffic_light", "traffic_light"), ("traffic_cone", "traffic_cone"),
    ("bollard", "barrier"), ("concrete_block", "miscellaneous"), ("debris", "miscellaneous"),
    # the official script matches names exactly, and a name in no list is in no class
    ("vehicles", None), ("Pedestrian", None), ("traffic-light", None), ("van", None), (None, None),
])
def test_region_classes(category, cls):
    assert region_class(category) == cls


def render(renderable):
    console = Console(record=True, width=120)
    console.print(renderable)
    return console.export_text()
