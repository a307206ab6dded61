"""`generation.engine: vllm` in a study: the LoRA-MoSE runs answer through vLLM, the others with mose's
own generation, each run's result saying which, and vLLM's answers are mose's own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from engine_helpers import mose_cli

from mose.study.methods import final_stage

pytestmark = pytest.mark.engine
TINY = {"pretrain": {"max_steps": 3, "batch_size": 8, "save_every": 0},
        "finetune": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "save_every": 0},
        "router": {"labelled": 16, "epochs": 5, "batch_size": 8},
        "generation": {"max_new_tokens": 6, "batch_size": 16, "engine": "vllm"}}


def test_a_study_answers_its_lora_mose_runs_through_vllm(tmp_path):
    study = {"name": "engine study", "output_dir": str(tmp_path / "out"), **TINY,
             "world": {"domain": "driving", "pretrain_samples": 32, "train_samples": 32, "test_samples": 12},
             "seeds": [0], "experiments": {"main": {"methods": ["dense_sft", "mose_lora"]}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    run = subprocess.run([str(Path(sys.executable).parent / "mose"), "study", "--config",
                          str(tmp_path / "study.yaml")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {json.loads(p.read_text())["run"]["method"]: json.loads(p.read_text())
               for p in (tmp_path / "out").rglob("result.json")}
    assert results["mose_lora"]["engine"] == "vllm" and results["dense_sft"]["engine"] == "torch"

    mose_run = next(p.parent for p in (tmp_path / "out").rglob("result.json")
                    if json.loads(p.read_text())["run"]["method"] == "mose_lora")
    test = next(p for p in (tmp_path / "out").rglob("test.jsonl") if p.parent.name == "qa")
    ours = tmp_path / "torch.jsonl"
    mose_cli("predict", "--model", str(mose_run / final_stage("mose_lora")), "--data", str(test), "--out",
             str(ours), "--max-new-tokens", "6", "--device", "cpu", "--dtype", "float32")
    written = (mose_run / "eval" / "predictions.jsonl").read_text().splitlines()
    theirs = {r["id"]: r for r in map(json.loads, written)}
    for row in map(json.loads, ours.read_text().splitlines()):
        assert theirs[row["id"]]["skill_chain"] == row["skill_chain"], row["id"]
        assert theirs[row["id"]]["answer"] == row["answer"], row["id"]
