"""A real OpenAI-style chat server on loopback, for the LLM annotator's tests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
