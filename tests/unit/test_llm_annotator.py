"""The LLM annotator against a real HTTP server on loopback, started by the test."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mose.data import Sample
from mose.endpoint import ChatEndpoint, EndpointError
from mose.skills.llm import LLMAnnotator, UnparsableAnswer, parse_skills
from mose.skills.taxonomy import load_taxonomy

DRIVING = load_taxonomy("driving")


class FakeLLM:
    """An OpenAI-style chat server: labels by keyword, fails on cue, records requests."""

    def __init__(self, fail_first: int = 0, die_after: int | None = None):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self.die_after = die_after
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                count = len(server.requests)
                if count <= server.fail_first or (server.die_after and count > server.die_after):
                    self.send_response(503)
                    self.end_headers()
                    return
                self.reply(server.answer(body))

            def reply(self, text):
                payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                      "model": "fake", "choices": [{
                                          "index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @staticmethod
    def answer(body):
        text = next(p["text"] for p in body["messages"][1]["content"] if p["type"] == "text")
        if "gibberish" in text:
            return "I think it is about pedestrians."
        perception = "vru" if "pedestrian" in text else "vehicle"
        return ("Sure: " + json.dumps({"perception": perception, "prediction": "crossing",
                                       "planning": "yield"}))

    def close(self):
        self.http.shutdown()


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
