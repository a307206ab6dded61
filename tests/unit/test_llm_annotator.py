"""The LLM annotator against a real HTTP server on loopback, started by the test."""

import pytest

from fake_llm import FakeLLM
from mose.data import Sample
from mose.endpoint import ChatEndpoint, EndpointError
from mose.skills.llm import LLMAnnotator, UnparsableAnswer, parse_skills
from mose.skills.taxonomy import load_taxonomy

DRIVING = load_taxonomy("driving")


@pytest.fixture
def server():
    fake = FakeLLM()
    yield fake
    fake.close()


def samples(tmp_path, n=4):
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "img.png")
    words = ["pedestrian", "truck", "gibberish", "pedestrian again"]
    return [Sample(id=f"s{i}", images=[str(tmp_path / "img.png")], question=f"what about the {words[i]}?",
                   answer="slow down") for i in range(n)]


def endpoint(url, **kw):
    return ChatEndpoint(url, "fake-model", backoff_s=0.01, **kw)


def test_labels_parse_strictly_and_unparsable_answers_are_reported(tmp_path, server):
    annotator = LLMAnnotator(DRIVING, endpoint(server.url), tmp_path / "cache.jsonl",
                             rules=["planning = stop when answer contains any of ['stop']"])
    labelled, report = annotator.annotate(samples(tmp_path))
    assert [s.skills and s.skills["perception"] for s in labelled] == ["vru", "vehicle", None, "vru"]
    assert report.asked == 4 and [u[0] for u in report.unparsable] == ["s2"]
    system = server.requests[0]["messages"][0]["content"]
    assert "vru (vulnerable road users" in system and "planning = stop when" in system
    user = server.requests[0]["messages"][1]["content"]
    assert user[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert server.requests[0]["temperature"] == 0


def test_cache_makes_a_rerun_ask_nothing(tmp_path, server):
    cache = tmp_path / "cache.jsonl"
    LLMAnnotator(DRIVING, endpoint(server.url), cache).annotate(samples(tmp_path))
    _, report = LLMAnnotator(DRIVING, endpoint(server.url), cache).annotate(samples(tmp_path))
    assert (report.asked, report.cached) == (0, 4) and len(server.requests) == 4


def test_transient_failures_are_retried_with_backoff(tmp_path):
    fake = FakeLLM(fail_first=2)
    try:
        labelled, report = LLMAnnotator(DRIVING, endpoint(fake.url), tmp_path / "c.jsonl").annotate(
            samples(tmp_path, 1))
        assert labelled[0].skills["perception"] == "vru" and len(fake.requests) == 3
    finally:
        fake.close()


def test_an_interrupted_run_resumes_without_asking_again(tmp_path):
    cache = tmp_path / "cache.jsonl"
    dying = FakeLLM(die_after=2)
    try:
        with pytest.raises(EndpointError, match="no answer after 2 tries"):
            LLMAnnotator(DRIVING, endpoint(dying.url, max_retries=1), cache).annotate(samples(tmp_path))
    finally:
        dying.close()
    assert len(cache.read_text().splitlines()) == 2
    healthy = FakeLLM()
    try:
        _, report = LLMAnnotator(DRIVING, endpoint(healthy.url), cache).annotate(samples(tmp_path))
        assert (report.asked, report.cached) == (2, 2) and len(healthy.requests) == 2
    finally:
        healthy.close()


@pytest.mark.parametrize("reply, reason", [
    ("no json here", "no JSON object"),
    ('{"perception": "vru"}', "not exactly"),
    ('{"perception": "ufo", "prediction": "general", "planning": "general"}', "unknown skill 'ufo'"),
    ('{"perception": "vru", "prediction": "general", "planning": "general", ', "no JSON object"),
])
def test_parse_is_strict(reply, reason):
    with pytest.raises(UnparsableAnswer, match=reason):
        parse_skills(reply, DRIVING)


def test_rules_first_then_the_llm_only_for_what_no_rule_decided(tmp_path, server):
    from mose.skills.annotate import annotate
    from mose.skills.rules import RuleAnnotator

    rules = RuleAnnotator.load("world-driving")
    decided = Sample(id="r", images=[], question="What is inside the red rectangle?", answer="car",
                     task="region_perception")
    open_ended = Sample(id="o", images=[], question="Describe the whole scene.", answer="ok")
    llm = LLMAnnotator(DRIVING, endpoint(server.url), tmp_path / "c.jsonl", send_images=False)
    labelled, coverage, report = annotate([decided, open_ended], rules, llm)
    assert coverage.undecided == [1] and report.asked == 1 and len(server.requests) == 1
    assert labelled[0].skills["perception"] == "vehicle"  # from the rules
    assert labelled[1].skills["prediction"] == "crossing"  # from the LLM
    with pytest.raises(ValueError, match="needs rules, an LLM, or both"):
        annotate([decided])
