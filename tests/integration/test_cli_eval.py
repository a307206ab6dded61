"""The user's path after training: predict, score, analyze and chat on a trained directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mose.data.world import generate

pytestmark = pytest.mark.slow
MOSE = str(Path(sys.executable).parent / "mose")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MOSE, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train = generate("driving", n=32, seed=0, out=root / "world")
    test = generate("driving", n=12, seed=0, out=root / "world", split="test")
    recipe = {"model": "tiny:qwen2_vl", "output_dir": str(root / "run"), "data": {"train": str(train)},
              "stages": {"convert": {"mose": {"taxonomy": "driving"}},
                         "router": {"max_steps": 2, "batch_size": 4, "eval_size": 4},
                         "sft": {"max_steps": 2, "batch_size": 4}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run("train", "--config", str(root / "recipe.yaml"), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return root, root / "run" / "sft", test


def test_predict_score_and_chat_on_a_trained_directory(trained):
    root, model, test = trained
    pred = root / "pred.jsonl"
    result = run("predict", "--model", str(model), "--data", str(test), "--out", str(pred),
                 "--max-new-tokens", "4", "--batch-size", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    references = [json.loads(line) for line in test.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in references]
    assert all(set(r["skill_chain"]) == {"perception", "prediction", "planning"} for r in rows)

    again = run("predict", "--model", str(model), "--data", str(test), "--out", str(pred))
    assert again.returncode == 0 and "complete already" in again.stdout

    scores = root / "scores.json"
    result = run("score", "world", "--pred", str(pred), "--ref", str(test), "--out", str(scores))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(scores.read_text())["n"] == 12

    report = root / "report"
    result = run("analyze", "--model", str(model), "--compare", str(root / "run" / "convert"),
                 "--data", str(test), "--pred", str(pred), "--scores", str(scores), "--out", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and "→ planning:" in html

    image = references[0]["images"][0]
    result = run("chat", "--model", str(model), "--image", str(test.parent / image),
                 "--max-new-tokens", "4", "What should the ego vehicle do?")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "perception:" in result.stdout and "→ planning:" in result.stdout


def test_bad_input_is_a_clear_error(trained):
    root, model, test = trained
    result = run("predict", "--model", str(root / "nowhere"), "--data", str(test), "--out", str(root / "x"))
    assert result.returncode == 2 and "no such directory" in result.stdout
    result = run("chat", "--model", str(model), "--image", str(root / "missing.png"), "hi")
    assert result.returncode == 2 and "missing.png" in result.stdout
    result = run("score", "coda-lm", "--pred", str(root / "pred.jsonl"), "--ref", str(test))
    assert result.returncode == 2 and "judge" in result.stdout
    result = run("analyze", "--model", str(root / "missing"), "--out", str(root / "r"))
    assert result.returncode == 2 and "missing" in result.stdout
    assert not (root / "r").exists()
