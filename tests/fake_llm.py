"""A real OpenAI-style chat server on loopback, for the LLM annotator's and the judge's tests."""

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What `respond` may return instead of plain text: an HTTP error, or a slow answer."""

    text: str = ""
    status: int = 200
    delay_s: float = 0.0


class FakeLLM:
    """An OpenAI-style chat server: labels by keyword, fails on cue, records requests.

    `respond(body) -> str | Reply` replaces the default keyword labeller (the judge's
    tests answer with ratings, HTTP 500s and slow replies).
    """

    def __init__(self, fail_first: int = 0, die_after: int | None = None, respond=None):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        self.die_after = die_after
        self.respond = respond or self.answer
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    count = len(server.requests)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if count <= server.fail_first or (server.die_after and count > server.die_after):
                        self.send_response(503)
                        self.end_headers()
                        return
                    reply = server.respond(body)
                    reply = reply if isinstance(reply, Reply) else Reply(reply)
                    time.sleep(reply.delay_s)
                    if reply.status != 200:
                        self.send_response(reply.status)
                        self.end_headers()
                        return
                    self.reply(reply.text)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer
                finally:
                    with server.lock:
                        server.in_flight -= 1

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
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

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
