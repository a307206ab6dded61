"""Study configs, the runs they plan and the mean ± spread tables (no training here)."""

from __future__ import annotations

import statistics

import pytest
import yaml

from mose.study import StudyError, load_study, study_from_dict
from mose.study.methods import method_stages
from mose.study.run import planned_data, pretrain_recipe
from mose.study.runs import RunSpec, plan_runs, run_recipe, run_settings
from mose.study.summary import data_size_table, fmt, headline, main_table, skill_data_table
from mose.train.recipe import recipe_from_dict

BASE = {"name": "t", "output_dir": "runs/t", "world": {"domain": "driving"},
        "pretrain": {"max_steps": 2}, "router": {"labelled": 100},
        "experiments": {"main": {"methods": ["dense_sft", "mose"]}}}


def config(**changes):
    return study_from_dict({**BASE, **changes}, source="t.yaml")


@pytest.mark.parametrize("name", ["driving", "robot"])
def test_shipped_study_configs_load_and_every_run_is_a_valid_recipe(name):
    study = load_study(f"configs/study/{name}.yaml")
    assert study.taxonomy == name and study.world.domain == name and len(study.seeds) >= 3
    data = planned_data(study, plan_runs(study))
    assert data.labelled is not None and data.pretrain is not None
    for spec in plan_runs(study):
        recipe = run_recipe(study, spec, data, "runs/pretrained")
        assert recipe.seed == spec.seed and recipe.data.fraction == spec.fraction
    assert pretrain_recipe(study, data).stages["pretrain"].trainable == "all"


@pytest.mark.parametrize("name", ["coda-lm", "robo2vlm"])
def test_real_benchmark_study_configs_load(name, monkeypatch):
    monkeypatch.setenv("MOSE_JUDGE_BASE_URL", "http://localhost:1/v1")
    study = load_study(f"configs/study/real/{name}.yaml", ["model=/models/Qwen2-VL-2B-Instruct"])
    assert study.data is not None and not study.is_tiny and study.score == name
    assert study.experiments.main.methods and "mose" in study.experiments.main.methods


@pytest.mark.parametrize("changes, message", [
    ({"experiments": {"main": {"methods": ["mose", "moe_3x1"]}}}, "experiments.main.methods names 'moe_3x1'"),
    ({"world": None}, "exactly one of 'world'"),
    ({"data": {"train": "a.jsonl", "test": "b.jsonl"}}, "exactly one of 'world'"),
    ({"pretrain": None}, "and 'pretrain' options"),
    ({"world": None, "data": {"train": "a.jsonl", "test": "b.jsonl"}, "score": "robo2vlm"},
     "it needs 'world'"),
    ({"world": None, "data": {"train": "a.jsonl", "test": "b.jsonl"}}, "'data' needs 'score'"),
    ({"model": "/models/qwen2-vl"}, "'pretrain' is for tiny models"),
    ({"recipe": {"data": None}}, "recipe.data must be a mapping"),
    ({"experiments": {"main": {"methods": []}}}, "experiments.main.methods is empty"),
    ({"experiments": {"skill_data": {"labelled": [10], "methods": ["moe_4x1"]}}}, "no skill routers"),
    ({"experiments": {"skill_data": {"labelled": [0]}}}, "experiments.skill_data.labelled[0] is 0"),
    ({"experiments": {"data_size": {"methods": ["mose"], "fractions": [1.5]}}},
     "experiments.data_size.fractions[0] is 1.5"),
    ({"world": {"domain": "driving", "test_samples": 0}}, "test_samples is 0"),
    ({"generation": {"max_new_tokens": 0}}, "max_new_tokens is 0"),
    ({"seeds": [0, 0]}, "distinct seeds"),
    ({"seeds": ["zero"]}, "'seeds[0]' is 'zero'"),
    ({"score": "mmlu"}, "'score' is 'mmlu'"),
    ({"finetune_steps": 3}, "unknown key 'finetune_steps'"),
    ({"world": {"domain": "kitchen"}}, "'world.domain' is 'kitchen'"),
    ({"experiments": {"data_size": {"methods": ["mose"], "fractions": [0.5, "all"]}}},
     "'experiments.data_size.fractions[1]' is 'all'"),
    ({"experiments": {}}, "names none of main"),
    ({"recipe": {"seed": 3}}, "recipe.seed cannot be shared"),
])
def test_bad_configs_name_the_file_and_key(changes, message):
    with pytest.raises(StudyError, match="t.yaml") as error:
        config(**changes)
    assert message in str(error.value)


def test_coda_lm_needs_its_judge_before_any_training(monkeypatch):
    for name in ("MOSE_JUDGE_MODEL", "MOSE_JUDGE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    real = {"world": None, "data": {"train": "a.jsonl", "test": "b.jsonl"}, "model": "/models/qwen",
            "taxonomy": "driving", "pretrain": None, "score": "coda-lm"}
    with pytest.raises(StudyError, match="judge.judge_model"):
        config(**real)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:1/v1")
    study = config(**real, judge={"judge_model": "gpt-4o-2024-05-13"})
    assert study.judge == {"judge_model": "gpt-4o-2024-05-13", "judge_base_url": "http://localhost:1/v1"}
    with pytest.raises(StudyError, match="unknown judge option"):
        config(**real, judge={"judge_model": "m", "temperature": 0})
    # Another judge scores otherwise: a finished run is reused only under the judge it was scored by.
    other = config(**real, judge={"judge_model": "gpt-4o-mini"})
    spec = plan_runs(study)[0]
    recipe = run_recipe(study, spec, planned_data(study, [spec]), "/models/qwen")
    assert run_settings(study, recipe) != run_settings(other, recipe)


def test_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "top.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "world": {"domain": "robot"}}))
    study = load_study(tmp_path / "top.yaml", ["seeds=[3, 4]", "finetune.lr=0.0003"])
    assert study.world.domain == "robot" and study.taxonomy == "robot"
    assert study.seeds == [3, 4] and study.finetune == {"lr": 3e-4}


def test_experiments_share_runs():
    study = config(seeds=[0, 1], experiments={
        "main": {"methods": ["dense_sft", "moe_4x1", "mose"]},
        "data_size": {"methods": ["moe_4x1", "mose"], "fractions": [0.5, 1.0]},
        "skill_data": {"labelled": [50, 100]},
        "diversity": {"methods": ["moe_4x1", "mose"]}})
    runs = plan_runs(study)
    per_seed = {RunSpec("dense_sft", 1.0, None, 0), RunSpec("moe_4x1", 1.0, None, 0),
                RunSpec("mose", 1.0, 100, 0),  # main, data_size at 1.0, skill_data at 100, diversity
                RunSpec("moe_4x1", 0.5, None, 0), RunSpec("mose", 0.5, 100, 0), RunSpec("mose", 1.0, 50, 0)}
    assert len(runs) == len(set(runs)) == 2 * len(per_seed)
    assert {r for r in runs if r.seed == 0} == per_seed
    assert RunSpec("mose", 0.5, 100, 1).name == "mose/f0.5-l100-s1"
    assert RunSpec("moe_4x1", 1.0, None, 1).name == "moe_4x1/f1-s1"
    # Without a default labelled set the routers learn from every label, beside skill_data's sizes.
    every = config(router={}, experiments={"main": {"methods": ["mose"]}, "skill_data": {"labelled": [10]}})
    assert [r.name for r in plan_runs(every)] == ["mose/f1-lall-s0", "mose/f1-l10-s0"]


def test_a_bad_finetune_option_is_found_before_any_work(tmp_path):
    from mose.study import run_study

    study = config(output_dir=str(tmp_path / "out"), finetune={"lrr": 1e-3})
    with pytest.raises(StudyError, match="unknown key 'finetune.lrr'"):  # the key the user wrote
        run_study(study)
    assert not (tmp_path / "out").exists()  # no data generated, nothing trained


@pytest.mark.parametrize("method", ["dense_sft", "moe_4x1", "moe_8x1", "mose", "mose_groups"])
def test_every_method_is_a_valid_recipe_on_the_same_budget(method):
    finetune = {"epochs": 2, "lr": 1e-3, "batch_size": 16}
    stages = method_stages(method, finetune, {"max_steps": 5}, "driving", "labelled.jsonl")
    recipe = recipe_from_dict({"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"},
                               "stages": stages})
    final = recipe.stages["sft"]
    assert (final.epochs, final.lr, final.batch_size) == (2, 1e-3, 16)
    assert ("router" in recipe.stages) == method.startswith("mose")
    if method.startswith("moe"):
        moe = recipe.stages["convert"].config()
        assert moe.shared_expert and moe.top_k == 1 and moe.num_experts == int(method[4])
    if method.startswith("mose"):
        assert recipe.stages["convert"].config().modality_groups == (method == "mose_groups")
        assert recipe.stages["router"].data == "labelled.jsonl"


def world_scores(overall, perception):
    return {"overall": overall, "n": 10, "by_level": {"perception": {"accuracy": perception, "n": 5}},
            "routing": {"chain": 50.0, "by_level": {}, "n": 10}}


def result(overall, perception=0.0, tokens=100.0):
    return {"scores": world_scores(overall, perception), "trainable_params": 1000, "active_params": 900,
            "tokens_per_s": tokens, "expert_similarity": 0.9}


def test_tables_are_mean_and_sample_sd_over_seeds():
    study = config(seeds=[0, 1, 2], experiments={
        "main": {"methods": ["dense_sft", "mose"]},
        "data_size": {"methods": ["mose"], "fractions": [0.5, 1.0]},
        "skill_data": {"labelled": [10, 100]}})
    mose = [61.0, 64.0, 70.0]
    runs = {RunSpec("mose", 1.0, 100, s): result(v, v - 10) for s, v in enumerate(mose)}
    runs |= {RunSpec("dense_sft", 1.0, None, s): result(50.0 + s) for s in range(3)}
    runs |= {RunSpec("mose", 0.5, 100, s): result(40.0) for s in range(3)}
    runs |= {RunSpec("mose", 1.0, 10, s): result(30.0 + 2 * s) for s in range(3)}
    table = main_table(study, runs)
    expected = f"{statistics.fmean(mose):.1f} ± {statistics.stdev(mose):.1f}"
    assert table["MoSE"]["overall"] == expected == "65.0 ± 4.6"
    assert table["MoSE"]["perception"] == "55.0 ± 4.6" and table["dense SFT"]["overall"] == "51.0 ± 1.0"
    assert table["MoSE"]["trainable"] == "1,000" and table["MoSE"]["tokens/s"] == "100 ± 0"
    assert data_size_table(study, runs) == {"MoSE": {"0.5 of the data": "40.0 ± 0.0",
                                                     "1 of the data": "65.0 ± 4.6"}}
    skill = skill_data_table(study, runs)
    assert skill["MoSE, 10 labelled"]["overall"] == "32.0 ± 2.0"
    assert skill["MoSE, 100 labelled"]["routing chain"] == "50.0 ± 0.0"
    assert fmt([3.0]) == "3.0"  # one seed: no spread to show


def test_headlines_per_benchmark():
    assert headline("robo2vlm", {"accuracy": 47.5, "n": 4}) == {"accuracy": 47.5}
    coda = {t: {"score": 6.0, "score_x10": 60.0} for t in ("general", "region", "suggestion", "average")}
    assert list(headline("coda-lm", coda)) == ["average", "general", "region", "suggestion"]
    # A task whose judgments all failed has no score and no average: shown as missing, never as None.
    failed = {**coda, "region": {"score": None, "score_x10": None, "failed": 3}}
    del failed["average"]
    assert list(headline("coda-lm", failed)) == ["general", "suggestion"]
    assert fmt([]) == "—"
    assert headline("world", world_scores(40.0, 30.0)) == {"overall": 40.0, "perception": 30.0,
                                                           "routing chain": 50.0}
