"""`mose predict --engine vllm` against the real engine: the same answers as mose's own, token for token
(the model and questions: tests/conftest.py)."""

import json
import subprocess
import sys

import pytest
from engine_helpers import MAX_NEW_TOKENS, mose_cli

import mose
from mose.models.processor import save_processor

pytestmark = pytest.mark.engine


def predictions(path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def predict(model, data, out, *extra):
    mose_cli("predict", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
             "--dtype", "float32", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "4", *extra)
    return predictions(out)


def assert_same_answers(torch_rows, vllm_rows):
    assert torch_rows.keys() == vllm_rows.keys()
    chains = {tuple(c["skill"] for c in row["skill_chain"].values()) for row in torch_rows.values()}
    assert len(chains) >= 3, "the questions took too few chains: the test could not see a wrong adapter"
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
