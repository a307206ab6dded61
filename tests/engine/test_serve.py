"""`mose serve` on loopback against a real vLLM server: the `openai` client gets mose's own answers with
their skill chains, and the server says clearly what failed (a backend down or slow, an adapter the
backend lacks, a malformed request, an image that does not decode) and keeps serving.

The backend holds the adapters of every chain the questions take but one, so that some questions
are routed to an adapter it lacks. (The model and questions: tests/conftest.py.)
"""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from engine_helpers import MAX_NEW_TOKENS, mose_cli
from openai import OpenAI
from PIL import Image

from mose.data import read_jsonl
from mose.data.collate import prompt_text
from mose.models.processor import load_processor
from mose.serving.backend import start_vllm_server
from mose.serving.requests import image_data_url

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    begin = time.monotonic()
    while time.monotonic() - begin < timeout_s:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            httpx.get(url + "/health", timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(url)


def start_mose_serve(model, log, *args: str, timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """`mose serve` on a free port, once it listens (with its own backend: once that is ready)."""
    port = free_port()
    command = [sys.executable, "-m", "mose.cli", "serve", "--model", str(model), "--port", str(port),
               "--device", "cpu", "--dtype", "float32", *args]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process, timeout_s)
    return process, url


def messages(sample, with_image: bool = True) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": image_data_url(Image.open(path).convert("RGB"))}}
               for path in (sample.images if with_image else [])]
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt_text(sample)}]}]


def ask(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def request_of(sample, with_image: bool = True, **extra) -> dict:
    # vLLM's token ids beside its text: its detokenizer holds back a trailing incomplete UTF-8
    # character, which a random model's answer may end on, so answers compare as tokens.
    return {"model": "mose", "messages": messages(sample, with_image), "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0, "return_token_ids": True} | extra


def by_client(body: dict) -> dict:
    """The request as `openai` takes it: what its signature lacks goes in `extra_body`."""
    return {k: v for k, v in body.items() if k != "return_token_ids"} | {
        "extra_body": {"return_token_ids": body["return_token_ids"]}}


def decoded(setting, token_ids: list[int]) -> str:
    """Generated tokens as `mose predict` writes them."""
    return setting["tokenizer"].decode(token_ids, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def setting(lora_mose, questions, tmp_path_factory):
    """Expected answers and routes, an export lacking one chain, and `mose serve` started before its
    backend is up; the backend starts in `backend_up`."""
    tmp = tmp_path_factory.mktemp("serve")
    data = questions[0]
    mose_cli("predict", "--model", str(lora_mose), "--data", str(data), "--out", str(tmp / "torch.jsonl"),
             "--device", "cpu", "--dtype", "float32", "--max-new-tokens", str(MAX_NEW_TOKENS))
    expected = {row["id"]: row for row in map(json.loads, (tmp / "torch.jsonl").read_text().splitlines())}
    mose_cli("route", "--model", str(lora_mose), "--data", str(data), "--out", str(tmp / "routes.jsonl"))
    rows = [json.loads(line) for line in (tmp / "routes.jsonl").read_text().splitlines()]
    routes = {row["id"]: row["adapter"] for row in rows}
    chains = {row["adapter"]: row["skill_chain"] for row in rows}
    assert len(chains) >= 3, "the questions take too few chains to test routing through the engine"
    lacking = sorted(chains)[0]
    chains = [f"--chain={','.join(f'{level}={skill}' for level, skill in chain.items())}"
              for name, chain in sorted(chains.items()) if name != lacking]
    mose_cli("export", "--model", str(lora_mose), "--out", str(tmp / "export"), *chains)
    port = free_port()
    serve, url = start_mose_serve(lora_mose, tmp / "serve.log", "--backend", f"http://127.0.0.1:{port}",
                                  "--batch-window-ms", "300")
    state = {"tokenizer": load_processor(lora_mose).tokenizer, "samples": list(read_jsonl(data)),
             "expected": expected, "routes": routes, "lacking": lacking,
             "url": url, "backend_port": port, "export": tmp / "export", "tmp": tmp}
    yield state
    serve.terminate()
    serve.wait(30)
    if "backend" in state:
        state["backend"].terminate()
        state["backend"].wait(30)


def served(setting):
    return [s for s in setting["samples"] if setting["routes"][s.id] != setting["lacking"]]


def test_a_backend_that_is_down_is_a_502_and_health_says_so(setting):
    answer = ask(setting["url"], request_of(served(setting)[0]))
    assert answer.status_code == 502
    assert "unreachable" in answer.json()["error"]["message"]
    assert httpx.get(setting["url"] + "/health").status_code == 503


def test_once_the_backend_is_up_the_openai_client_gets_mose_answers_with_their_chains(setting):
    setting["backend"] = start_vllm_server(setting["export"], setting["backend_port"], "float32",
                                           log=setting["tmp"] / "vllm.log")
    assert httpx.get(setting["url"] + "/health").status_code == 200
    client = OpenAI(base_url=setting["url"] + "/v1", api_key="unused")
    for sample in served(setting):
        body = request_of(sample)
        reply = client.chat.completions.create(**by_client(body))
        want = setting["expected"][sample.id]
        assert decoded(setting, reply.choices[0].model_extra["token_ids"]) == want["answer"], sample.id
        assert reply.choices[0].message.content.strip() in want["answer"]
        extension = reply.model_extra["mose"]
        assert extension["skill_chain"] == want["skill_chain"]
        assert extension["adapter"] == setting["routes"][sample.id]


def test_the_client_example_prints_the_answer_and_its_chain(setting):
    sample = served(setting)[0]
    command = [sys.executable, str(ROOT / "examples" / "serve_client.py"), "--url", setting["url"] + "/v1",
               "--image", sample.images[0], "--max-tokens", str(MAX_NEW_TOKENS), prompt_text(sample)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for level, choice in setting["expected"][sample.id]["skill_chain"].items():
        assert f"{level}: {choice['skill']} (" in run.stdout
    assert f"adapter: {setting['routes'][sample.id]}" in run.stdout


def test_streaming_passes_through_with_the_chain_in_its_first_event(setting):
    sample = served(setting)[0]
    client = OpenAI(base_url=setting["url"] + "/v1", api_key="unused")
    tokens = [t for chunk in client.chat.completions.create(**by_client(request_of(sample)), stream=True)
              if chunk.choices for t in chunk.choices[0].model_extra.get("token_ids") or []]
    assert decoded(setting, tokens) == setting["expected"][sample.id]["answer"]
    with httpx.stream("POST", setting["url"] + "/v1/chat/completions", json=request_of(sample, stream=True),
                      timeout=300) as response:
        assert response.headers["x-mose-adapter"] == setting["routes"][sample.id]
        first = next(line for line in response.iter_lines() if line.startswith("data: {"))
    assert json.loads(first[len("data: "):])["mose"]["adapter"] == setting["routes"][sample.id]


def test_an_adapter_the_backend_lacks_is_a_503_naming_it(setting):
    sample = next(s for s in setting["samples"] if setting["routes"][s.id] == setting["lacking"])
    answer = ask(setting["url"], request_of(sample))
    assert answer.status_code == 503
    assert setting["lacking"] in answer.json()["error"]["message"]


@pytest.mark.parametrize("body, says", [
    ({"model": "mose"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, {"type": "text", "text": "what?"}]}]},
     "the image does not decode"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://example.invalid/a.png"}}]}]}, "data: URLs"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "needs 'role'"),
])
def test_bad_requests_are_400s_and_the_server_keeps_serving(setting, body, says):
    answer = ask(setting["url"], body)
    assert answer.status_code == 400
    assert says in answer.json()["error"]["message"]
    sample = served(setting)[0]
    reply = ask(setting["url"], request_of(sample)).json()
    assert decoded(setting, reply["choices"][0]["token_ids"]) == setting["expected"][sample.id]["answer"]


def test_requests_arriving_together_are_routed_in_one_batch(setting):
    before = httpx.get(setting["url"] + "/health").json()["routing"]
    samples = served(setting)[:4]
    with ThreadPoolExecutor(len(samples)) as pool:
        answers = list(pool.map(lambda s: ask(setting["url"], request_of(s, max_tokens=1)), samples))
    assert all(a.status_code == 200 for a in answers)
    after = httpx.get(setting["url"] + "/health").json()["routing"]
    assert after["routed"] - before["routed"] == len(samples)
    assert after["batches"] - before["batches"] < len(samples)


def test_a_slow_backend_is_a_504(setting, lora_mose):
    slow, url = start_mose_serve(lora_mose, setting["tmp"] / "slow.log", "--backend",
                                 f"http://127.0.0.1:{setting['backend_port']}", "--backend-timeout", "0.001")
    try:
        answer = ask(url, request_of(served(setting)[0]))
        assert answer.status_code == 504
        assert "did not answer" in answer.json()["error"]["message"]
    finally:
        slow.terminate()
        slow.wait(30)


def test_mose_serve_starts_its_own_backend(lora_mose, setting):
    backend_port = free_port()
    process, url = start_mose_serve(lora_mose, setting["tmp"] / "own.log", "--export", str(setting["export"]),
                                    "--backend-port", str(backend_port), timeout_s=600)
    try:
        sample = served(setting)[0]
        reply = ask(url, request_of(sample)).json()
        assert decoded(setting, reply["choices"][0]["token_ids"]) == setting["expected"][sample.id]["answer"]
        assert reply["mose"]["adapter"] == setting["routes"][sample.id]
    finally:
        process.terminate()
        process.wait(60)
    with pytest.raises(httpx.ConnectError):  # the backend it started stopped with it
        httpx.get(f"http://127.0.0.1:{backend_port}/health", timeout=5)
