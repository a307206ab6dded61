"""`mose study` as a user runs it: two worlds from one command, every experiment, reruns reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
MOSE = str(Path(sys.executable).parent / "mose")
TINY = {"pretrain": {"max_steps": 3, "batch_size": 8, "save_every": 0},
        "finetune": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "save_every": 0},
        "router": {"labelled": 16, "epochs": 5, "batch_size": 8},  # epochs: every labelled size its passes
        "generation": {"max_new_tokens": 4, "batch_size": 16}}


def mose_study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MOSE, "study", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    driving = {"name": "tiny driving study", "output_dir": str(root / "driving"), **TINY,
               "world": {"domain": "driving", "pretrain_samples": 48, "train_samples": 48,
                         "test_samples": 16},
               "seeds": [0, 1],
               "experiments": {"main": {"methods": ["dense_sft", "mose"]},
                               "data_size": {"methods": ["mose"], "fractions": [0.5, 1.0]},
                               "skill_data": {"labelled": [8, 16]},
                               "diversity": {"methods": ["mose"]}}}
    robot = {"base": "driving.yaml", "name": "tiny robot study", "output_dir": str(root / "robot"),
             "world": {"domain": "robot"}, "seeds": [0],
             "experiments": {"data_size": None, "skill_data": None, "diversity": None,
                             "main": {"methods": ["moe_4x1", "mose", "mose_oracle"]}}}
    (root / "driving.yaml").write_text(yaml.safe_dump(driving))
    (root / "robot.yaml").write_text(yaml.safe_dump(robot))
    # As `--config configs/study/*.yaml` expands in a shell: the second file follows the first.
    result = mose_study("--config", str(root / "driving.yaml"), str(root / "robot.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result.stdout


def test_a_study_writes_every_table_the_figure_and_the_report(studies):
    root, log = studies
    results = json.loads((root / "driving" / "results.json").read_text())
    tables = results["tables"]
    assert list(tables) == ["main comparison", "training-data size", "skill-data size", "expert diversity"]
    assert set(tables["main comparison"]) == {"dense SFT", "MoSE"}
    mose = tables["main comparison"]["MoSE"]
    assert "±" in mose["overall"] and "±" in mose["routing chain"] and int(mose["trainable"].replace(",", ""))
    # Beside MoSE: its routers' held-out accuracy after the router stage, and the probe ceiling there.
    assert all("±" in mose[f"{kind} {level}"] for kind in ("router", "probe", "routing")
               for level in ("perception", "prediction", "planning"))
    assert tables["main comparison"]["dense SFT"]["router perception"] == "—"
    assert set(tables["training-data size"]["MoSE"]) == {"0.5 of the data", "1 of the data"}
    assert set(tables["skill-data size"]) == {"MoSE, 8 labelled", "MoSE, 16 labelled"}
    diversity = tables["expert diversity"]["MoSE"]
    assert float(diversity["expert similarity"].split(" ± ")[0]) <= 1.0
    assert " of " in diversity["never routed"]  # experts no test token reached are left out, and counted
    # Runs are shared between experiments: 4 per seed (dense, MoSE, MoSE on half, MoSE on 8 labels).
    assert sorted(r["run"]["method"] for r in results["runs"]) == ["dense_sft"] * 2 + ["mose"] * 6
    for run in results["runs"]:
        assert 0 <= run["scores"]["overall"] <= 100 and run["settings"]["recipe"]["seed"] in (0, 1)
        if run["run"]["method"] == "mose":
            assert set(run["router"]) >= {"router_acc/perception", "router_acc/chain", "probe_acc/perception"}
    assert (root / "driving" / "runs" / "mose" / "f0.5-l16-s1" / "result.json").is_file()
    page = (root / "driving" / "report.html").read_text()
    assert "tiny driving study" in page and "training-data size" in page and "Expert diversity" in page
    assert page.count("data:image/png;base64,") >= 3  # the figure, a heatmap, sample images
    robot = json.loads((root / "robot" / "results.json").read_text())
    oracle = "MoSE oracle routes (upper bound) †"
    assert set(robot["tables"]["main comparison"]) == {"MoE 4×1", "MoSE", oracle}
    # The upper bound routes by the test labels: its chains are the labels, and its caption says so.
    assert robot["tables"]["main comparison"][oracle]["routing chain"] == "100.0"
    assert "an upper bound on routing, not a result" in (root / "robot" / "report.html").read_text()
    words = " ".join(log.split())  # rich wraps long lines
    assert "rules 'world-robot' labelled" in words and "rules 'world-driving' labelled" in words


def test_a_rerun_reuses_every_run_and_changed_settings_are_refused(studies):
    root, _ = studies
    before = (root / "driving" / "results.json").read_text()
    again = mose_study("--config", str(root / "driving.yaml"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    words = " ".join(again.stdout.split())
    assert words.count("(reused)") == 1 + 8  # the pretraining and every run
    assert json.loads((root / "driving" / "results.json").read_text())["runs"] == json.loads(before)["runs"]
    changed = mose_study("--config", str(root / "driving.yaml"), "finetune.lr=0.01")
    assert changed.returncode == 2 and "other settings" in changed.stdout
    bad = mose_study("--config", str(root / "driving.yaml"), "experiments.main.methods=[mose,moe_3x1]")
    assert bad.returncode == 2 and "moe_3x1" in bad.stdout and "driving.yaml" in bad.stdout
    both = mose_study("--config", str(root / "driving.yaml"), str(root / "robot.yaml"), f"output_dir={root}")
    assert both.returncode == 2 and "two studies would write to" in " ".join(both.stdout.split())
