"""Study configs, the runs they plan and the mean ± spread tables (no training here)."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import mose
from mose.data import Sample, read_jsonl, write_jsonl
from mose.data.world import general_weights, generate
from mose.eval.analysis import LayerSimilarity, expert_similarity
from mose.eval.predictions import Prediction
from mose.layers.blocks import expert_blocks
from mose.study import StudyError, load_study, run_study, study_from_dict
from mose.study.data import StudyData, annotate_questions, write_curriculum
from mose.study.measure import diversity, expert_tokens, routed_pairs, routed_similarity, routing_on_test
from mose.study.methods import METHODS, final_stage, method_stages
from mose.study.run import _claim, _data_line, _note, planned_data, pretrain_recipe
from mose.study.runs import RunSpec, main_run, plan_runs, router_metrics, run_recipe, run_settings
from mose.study.summary import (
    data_size_table,
    diversity_table,
    fmt,
    headline,
    main_table,
    skill_data_table,
)
from mose.train.recipe import RouterStage, recipe_from_dict

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
    # Robot scenes are learnt with the vision tower frozen (docs/calibration.md); driving trains it.
    tower = {"driving": "all", "robot": "language"}[name]
    assert pretrain_recipe(study, data).stages["pretrain"].trainable == tower
    # The oracle upper bound sits beside the methods; the routers train by the stage's own bounds
    # (epochs, early stopping on its held-out split), never a step count every labelled size shares.
    assert "mose_oracle" in study.experiments.main.methods
    assert "max_steps" not in study.router and "eval_size" not in study.router
    for spec in plan_runs(study):
        router = run_recipe(study, spec, data, "runs/pretrained").stages.get("router")
        assert router is None or router.eval_size >= 1


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
    ({"experiments": {"skill_data": {"labelled": [10], "methods": ["mose_oracle"]}}},
     "'mose_oracle', which has no skill routers"),
    ({"router": {"labelled": 100, "max_steps": 50}, "experiments": {"skill_data": {"labelled": [10, 100]}}},
     "router.max_steps gives every labelled-set size"),
    ({"curriculum": [{"max_steps": 5}]}, "curriculum.1 needs 'kinds'"),
    ({"curriculum": [{"kinds": ["count"]}, {"kinds": ["gripper_state"]}]},
     "curriculum.2.kinds names 'gripper_state'; the driving world's general kinds are"),
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


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_is_a_valid_recipe_on_the_same_budget(method):
    finetune = {"epochs": 2, "lr": 1e-3, "batch_size": 16}
    stages = method_stages(method, finetune, {"epochs": 5}, "driving", "labelled.jsonl")
    recipe = recipe_from_dict({"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"},
                               "stages": stages})
    final = recipe.stages["sft"]
    assert (final.epochs, final.lr, final.batch_size) == (2, 1e-3, 16)
    assert ("router" in recipe.stages) == METHODS[method].routed == (method in ("mose", "mose_groups",
                                                                              "mose_question", "mose_lora"))
    if "router" in recipe.stages:  # the stage's held-out split is kept: it reports the routers' accuracy
        assert recipe.stages["router"].eval_size >= 1 and recipe.stages["router"].epochs == 5
    if method.startswith("moe"):
        moe = recipe.stages["convert"].config()
        assert moe.shared_expert and moe.top_k == 1 and moe.num_experts == int(method[4])
    if method.startswith("mose"):
        assert recipe.stages["convert"].config().modality_groups == (method == "mose_groups")
        assert ("router" not in recipe.stages) or recipe.stages["router"].data == "labelled.jsonl"


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


@pytest.mark.parametrize("method", ["mose_lora", "moe_4x1_lora"])
def test_lora_methods_convert_to_lora_experts_like_for_like(method):
    stages = method_stages(method, {"epochs": 2}, {"labelled": 9}, "driving", "labelled.jsonl")
    full = method_stages(method.removesuffix("_lora"), {"epochs": 2},
                         {"labelled": 9}, "driving", "labelled.jsonl")
    convert = stages["convert"]["mose" if method == "mose_lora" else "token_moe"]
    assert convert.pop("experts") == "lora" and convert.pop("lora_rank") > 0
    assert stages == full  # everything else as the full-expert method


@pytest.mark.parametrize("method", ["mose", "mose_groups", "mose_question"])
def test_routed_mose_fine_tunes_skill_by_skill_then_refits_its_routers(method):
    stages = method_stages(method, {"epochs": 2}, {"labelled": 9}, "driving", "labelled.jsonl")
    recipe = recipe_from_dict({"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"},
                               "stages": stages})
    assert list(recipe.stages) == ["convert", "router", "sft", "refit"] and final_stage(method) == "refit"
    sft, router, refit = recipe.stages["sft"], recipe.stages["router"], recipe.stages["refit"]
    assert sft.teacher_forcing and not sft.train_routers  # each expert learns its own skill's samples
    assert isinstance(refit, RouterStage) and refit == router  # fitted again on the fine-tuned layers
    assert final_stage("dense_sft") == final_stage("mose_oracle") == "sft"


def test_the_oracle_routes_by_labels_in_training_and_at_test():
    stages = method_stages("mose_oracle", {"epochs": 2}, {"labelled": 9}, "driving", "labelled.jsonl")
    recipe = recipe_from_dict({"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"},
                               "stages": stages})
    assert list(recipe.stages) == ["convert", "sft"]  # no router stage: its routers never choose
    sft = recipe.stages["sft"]
    assert sft.teacher_forcing and not sft.train_routers and sft.epochs == 2
    assert sft.data is None  # the world's training records carry their own skills
    assert METHODS["mose_oracle"].mose and not METHODS["mose_oracle"].routed
    assert "upper bound" in METHODS["mose_oracle"].label and "†" in METHODS["mose_oracle"].label
    study = config(experiments={"main": {"methods": ["mose", "mose_oracle"]}})
    oracle, routed = plan_runs(study)[::-1]
    assert oracle.name == "mose_oracle/f1-s0" and oracle.labelled is None
    data = planned_data(study, [oracle, routed])
    recipes = {spec: run_recipe(study, spec, data, "runs/pretrained") for spec in (oracle, routed)}
    # Answered by the test labels: in the fingerprint a finished run is reused under.
    assert run_settings(study, recipes[oracle], oracle)["test_routes"] == "labelled"
    assert "test_routes" not in run_settings(study, recipes[routed], routed)
    # A benchmark's oracle fine-tunes on the labelled file (its records need not carry skills).
    real = config(world=None, data={"train": "a.jsonl", "test": "b.jsonl"}, score="robo2vlm",
                  model="/models/qwen", pretrain=None, taxonomy="robot",
                  experiments={"main": {"methods": ["mose_oracle"]}})
    data = planned_data(real, plan_runs(real))
    assert data.labelled is not None  # the shipped rules will label the training split
    recipe = run_recipe(real, plan_runs(real)[0], data, "/models/qwen")
    assert recipe.stages["sft"].data == str(data.labelled)
    assert _note({METHODS["mose_oracle"].label: {}}).startswith(" · † ") and _note({"MoSE": {}}) == ""


def test_mose_question_converts_with_the_question_taxonomy_and_learns_from_its_labels():
    study = load_study("configs/study/driving.yaml")
    assert "mose_question" in study.experiments.main.methods
    assert (study.question_taxonomy, study.question_rules) == ("driving-question", "world-driving-question")
    specs = plan_runs(study)
    data = planned_data(study, specs)
    assert data.labelled_question.name == "labelled-question.jsonl" != data.labelled.name
    assert data.test_for(True) == data.test_question != data.test == data.test_for(False)
    question = main_run(study, "mose_question", 0)
    assert question in specs and question.name == "mose_question/f1-l1000-s0"
    recipe = run_recipe(study, question, data, "runs/pretrained")
    assert recipe.stages["convert"].config().taxonomy.name == "driving-question"
    # Its routers and its fine-tuning read the question labels (a record's skills must be the model's).
    assert recipe.stages["router"].data == recipe.stages["sft"].data == str(data.labelled_question)
    assert recipe.stages["router"].labelled == 1000
    # The other MoSE methods stay on the content taxonomy and the training split.
    for method in ("mose", "mose_oracle"):
        other = run_recipe(study, main_run(study, method, 0), data, "runs/pretrained")
        assert other.stages["convert"].config().taxonomy.name == "driving"
        assert other.stages["sft"].data is None
    routed = run_recipe(study, main_run(study, "mose", 0), data, "runs/pretrained")
    assert routed.stages["router"].data == str(data.labelled)
    # Without mose_question no question labels are planned.
    assert planned_data(config(), plan_runs(config())).labelled_question is None


@pytest.mark.parametrize("changes, message", [
    ({"question_rules": "nope"},
     "question_rules 'nope' for question_taxonomy 'driving-question': unknown rule set"),
    ({"question_taxonomy": "robot"}, "mose_question needs 'question_rules'"),
    ({"question_taxonomy": "robot", "question_rules": "world-driving-question"}, "unknown skill"),
])
def test_mose_questions_rules_are_checked_when_the_config_loads(changes, message):
    with pytest.raises(StudyError, match=message):
        config(**changes, experiments={"main": {"methods": ["mose", "mose_question"]}})
    config(**changes)  # unused without mose_question


def test_question_labels_are_part_of_the_folders_settings_once_made(tmp_path):
    out = tmp_path / "study"
    plain = config(output_dir=str(out))
    _claim(plain, plan_runs(plain))
    settings = json.loads((out / "study.json").read_text())
    assert "question_rules" not in settings  # a folder made before mose_question ran
    question = config(output_dir=str(out), experiments={"main": {"methods": ["mose", "mose_question"]}})
    _claim(question, plan_runs(question))  # adding the method adds its runs, nothing else
    assert json.loads((out / "study.json").read_text())["question_rules"] == "world-driving-question"
    _claim(plain, plan_runs(plain))  # a study without it keeps them
    assert json.loads((out / "study.json").read_text())["question_taxonomy"] == "driving-question"
    rules = tmp_path / "mine.yaml"
    rules.write_text("taxonomy: driving-question\nrules: []\n")
    other = config(output_dir=str(out), question_rules=str(rules),
                   experiments={"main": {"methods": ["mose_question"]}})
    with pytest.raises(StudyError, match="question_rules"):  # its labels were made by the others
        _claim(other, plan_runs(other))


def test_a_curriculum_pretrains_on_its_kinds_first_with_the_pretrainings_options(tmp_path):
    study = config(output_dir=str(tmp_path / "study"), world={"domain": "robot"},
                   pretrain={"max_steps": 20, "lr": 5e-4, "batch_size": 4},
                   curriculum=[{"kinds": ["count"], "max_steps": 8},
                               {"kinds": ["count", "gripper_state"], "lr": 1e-3},
                               {"kinds": ["locate"], "epochs": 2}])
    data = planned_data(study, plan_runs(study))
    recipe = pretrain_recipe(study, data)
    assert list(recipe.stages) == ["curriculum_1", "curriculum_2", "curriculum_3", "pretrain"]
    first, second, third, last = recipe.stages.values()
    assert (first.max_steps, first.lr, first.batch_size, first.trainable) == (8, 5e-4, 4, "all")
    assert (second.max_steps, second.lr) == (20, 1e-3)
    assert (third.epochs, third.max_steps) == (2, None)  # its own bound, not the pretraining's steps
    assert [first.data, second.data, third.data, last.data] == [*map(str, data.curriculum), None]
    assert recipe.data.train == str(data.pretrain)
    # Each stage's records are the general file's of its kinds, beside it (its images are theirs).
    generate("robot", 120, seed=0, out=data.pretrain.parent, split="pretrain",
             weights=general_weights("robot"))
    write_curriculum(data.pretrain, data.curriculum, [c["kinds"] for c in study.curriculum])
    everything = list(read_jsonl(data.pretrain))
    for path, stage in zip(data.curriculum, study.curriculum, strict=True):
        records = list(read_jsonl(path))
        assert records == [s for s in everything if s.meta["question_kind"] in stage["kinds"]]
    assert len(list(read_jsonl(data.curriculum[1]))) > len(list(read_jsonl(data.curriculum[0]))) > 0
    bad = replace(study, curriculum=[{"kinds": ["count"], "lr": -1}])
    with pytest.raises(StudyError, match="curriculum.1.lr is -1"):  # before any work, as run_study builds it
        pretrain_recipe(bad, planned_data(bad, plan_runs(bad)))


def test_a_curriculum_is_part_of_the_folders_general_model(tmp_path):
    out = tmp_path / "study"
    plain = config(output_dir=str(out))
    _claim(plain, plan_runs(plain))
    (out / "study.json").write_text(json.dumps(  # a folder made before curricula: no such key
        {k: v for k, v in json.loads((out / "study.json").read_text()).items() if k != "curriculum"}))
    _claim(plain, plan_runs(plain))
    taught = config(output_dir=str(out), curriculum=[{"kinds": ["count"]}])
    with pytest.raises(StudyError, match="curriculum"):  # its runs were fine-tuned from another model
        _claim(taught, plan_runs(taught))


def test_the_question_rules_label_both_splits_and_leave_the_records_alone(tmp_path):
    train = generate("driving", 20, seed=0, out=tmp_path / "qa", split="train")
    test = generate("driving", 10, seed=0, out=tmp_path / "qa", split="test")
    data = StudyData(train=train, test=test, labelled_question=tmp_path / "lq.jsonl",
                     test_question=tmp_path / "tq.jsonl")
    annotation = annotate_questions(data, "world-driving-question", "driving-question")
    assert (annotation.samples, annotation.test_samples, annotation.agreement) == (20, 10, None)
    taxonomy = mose.load_taxonomy("driving-question")
    for source, labelled in ((train, data.labelled_question), (test, data.test_question)):
        records, questions = list(read_jsonl(source)), list(read_jsonl(labelled))
        assert [r.id for r in records] == [q.id for q in questions]
        pairs = zip(records, questions, strict=True)
        assert all(r.answer == q.answer and r.question == q.question for r, q in pairs)
        for question in questions:
            taxonomy.encode(question.skills)
    assert "with taxonomy 'driving-question'" in _data_line(data, None, annotation)


def test_an_oracle_study_refuses_unlabelled_test_records_before_any_training(tmp_path):
    records = [Sample(id=f"r{i}", images=[], question="q", answer="a") for i in range(3)]
    for name in ("train", "test"):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    write_jsonl(tmp_path / "labelled.jsonl", [replace(r, skills={}) for r in records])
    files = {name: str(tmp_path / f"{name}.jsonl") for name in ("train", "test", "labelled")}
    study = config(world=None, data=files,
                   score="robo2vlm", model="/models/qwen", pretrain=None, taxonomy="robot",
                   output_dir=str(tmp_path / "out"), experiments={"main": {"methods": ["mose_oracle"]}})
    with pytest.raises(StudyError, match=r"mose_oracle routes by the test labels: .*test\.jsonl, record r0, "
                                         "field 'skills'"):
        run_study(study)
    assert not (tmp_path / "out" / "runs").exists()


def router_stage(perception, chain, probe):
    return {"router_acc/perception": perception, "router_acc/chain": chain, "probe_acc/perception": probe}


def test_the_main_table_shows_routing_accuracy_beside_every_mose_row():
    study = config(seeds=[0, 1], experiments={"main": {"methods": ["dense_sft", "mose", "mose_oracle"]}})
    runs = {RunSpec("dense_sft", 1.0, None, s): result(50.0) for s in range(2)}
    for s in range(2):
        runs[RunSpec("mose", 1.0, 100, s)] = {
            **result(60.0), "router": router_stage(0.5 + 0.1 * s, 0.25, 0.75),
            "routing": {"n": 10, "by_level": {"perception": 40.0 + 10 * s, "prediction": 70.0,
                                              "planning": 90.0}, "chain": 30.0}}
        runs[RunSpec("mose_oracle", 1.0, None, s)] = {
            **result(70.0), "router": None,
            "routing": {"n": 10, "by_level": {"perception": 100.0, "prediction": 100.0,
                                              "planning": 100.0}, "chain": 100.0}}
    table = main_table(study, runs)
    mose_row, dense, oracle = table["MoSE"], table["dense SFT"], table[METHODS["mose_oracle"].label]
    assert list(mose_row) == list(dense) == list(oracle)  # one column order for every row
    assert mose_row["routing perception"] == "45.0 ± 7.1" and mose_row["routing chain"] == "30.0 ± 0.0"
    assert mose_row["router perception"] == "55.0 ± 7.1" and mose_row["router chain"] == "25.0 ± 0.0"
    assert mose_row["probe perception"] == "75.0 ± 0.0" and mose_row["probe planning"] == "—"
    routing = [c for c in dense if c.startswith(("routing", "router", "probe"))]
    assert len(routing) == 3 + 1 + 3 + 1 + 3 and all(dense[c] == "—" for c in routing)
    assert oracle["routing chain"] == "100.0 ± 0.0" and oracle["router perception"] == "—"
    # A seed without router metrics (a result from before they were kept) leaves the cell empty,
    # never a mean over the other seeds.
    runs[RunSpec("mose", 1.0, 100, 1)]["router"] = None
    assert main_table(study, runs)["MoSE"]["router perception"] == "—"


def test_router_metrics_keep_the_router_stages_held_out_accuracies():
    stage = {"output": "o", "loss": 0.3, "skipped": True, "router_acc/perception": 0.5,
             "router_acc/chain": 0.25, "probe_acc/perception": 0.75, "probe_acc/planning": float("nan")}
    assert router_metrics(stage) == {"router_acc/perception": 0.5, "router_acc/chain": 0.25,
                                     "probe_acc/perception": 0.75}
    assert router_metrics(None) is None


def test_routing_on_test_compares_chains_with_labels_per_level():
    def chain(**skills):
        return {level: {"skill": skill, "prob": 0.9} for level, skill in skills.items()}

    test = [Sample(id="a", images=[], question="q", skills={"perception": "vru", "planning": "yield"}),
            Sample(id="b", images=[], question="q", skills={"perception": "vehicle"}),
            Sample(id="c", images=[], question="q")]  # unlabelled: not counted
    chains = {"a": chain(perception="vru", prediction="general", planning="stop"),
              "b": chain(perception="vru", prediction="general", planning="general"),
              "c": chain(perception="vru", prediction="general", planning="general")}
    predictions = {i: Prediction(i, "x", c) for i, c in chains.items()}
    routing = routing_on_test(predictions, test, ["perception", "prediction", "planning"])
    assert routing == {"n": 2, "by_level": {"perception": 50.0, "prediction": 100.0, "planning": 50.0},
                       "chain": 0.0}
    assert routing_on_test({k: replace(v, skill_chain=None) for k, v in predictions.items()}, test,
                           ["perception"]) is None


def test_diversity_counts_only_experts_that_got_tokens():
    # shared, then 3 routed experts: e2 is far from the others but never received a token.
    matrix = np.array([[1.0, 0.9, 0.9, 0.1], [0.9, 1.0, 0.8, 0.0], [0.9, 0.8, 1.0, 0.2],
                       [0.1, 0.0, 0.2, 1.0]])
    layer = LayerSimilarity(0, None, ("shared", "e0", "e1", "e2"), matrix)
    assert sorted(routed_pairs(layer, np.array([True, True, False]))) == [0.8, 0.8]
    assert layer.routed_off_diagonal().mean() < 0.8  # what counting e2 would have said
    other = LayerSimilarity(2, None, ("shared", "e0", "e1", "e2"), matrix)
    measured = routed_similarity([layer, other], {0: np.array([5, 3, 0]), 2: np.array([0, 0, 9])})
    assert measured.similarity == pytest.approx(0.8)  # layer 2 has one reached expert: no pair
    assert (measured.never_routed, measured.experts) == (3, 6)
    with pytest.raises(ValueError, match="3 routed experts but a mask of 2"):
        routed_pairs(layer, np.array([True, True]))


@pytest.fixture(scope="module")
def robot_prompts(tmp_path_factory):
    return list(read_jsonl(generate("robot", 6, seed=0, out=tmp_path_factory.mktemp("robot"))))


def test_a_never_routed_expert_is_left_out_of_a_mose_models_diversity(tiny, robot_prompts):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.MoSEConfig(taxonomy="robot"))
    # Forced routes: perception layer 0 sends its samples to `object` or `spatial` only; the
    # other levels route everything to `general`.
    samples = [replace(s, skills={"perception": "object" if i % 2 else "spatial"})
               for i, s in enumerate(robot_prompts)]
    block = next(b for b in expert_blocks(model) if b.layer_idx == 0)
    gripper = model.mose_config.taxonomy.levels[0].index("gripper")
    with torch.no_grad():  # an expert that training changed, but no test token ever reached
        block.experts.gate_up_proj[gripper].normal_(generator=torch.Generator().manual_seed(0))
    tokens = expert_tokens(model, processor, samples, batch_size=4, force_skills=True)
    assert tokens[0][gripper] == 0 and (tokens[0] > 0).sum() == 2 and all((tokens[i] > 0).sum() == 1
                                                                            for i in (2, 4))
    measured = diversity(model, processor, samples, batch_size=4, force_skills=True)
    assert measured.similarity == 1.0  # object and spatial are still the upcycled copies
    assert (measured.never_routed, measured.experts) == (2 + 3 + 3, 12)
    unmasked = expert_similarity(model)[0].routed_off_diagonal()
    assert unmasked.mean() < 0.99  # the old measure counted the never-routed expert's difference


def test_a_token_moe_counts_every_real_prompt_token_once_per_layer(tiny, robot_prompts):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.TokenMoEConfig(num_experts=4, top_k=1))
    tokens = expert_tokens(model, processor, robot_prompts, batch_size=4)
    left = expert_tokens(model, processor, robot_prompts, batch_size=6)  # other batches, same counts
    totals = {layer: int(counts.sum()) for layer, counts in tokens.items()}
    assert len(set(totals.values())) == 1 and {k: v.tolist() for k, v in tokens.items()} == {
        k: v.tolist() for k, v in left.items()}
    with pytest.raises(ValueError, match="force_skills needs a MoSE model"):
        expert_tokens(model, processor, robot_prompts, force_skills=True)


def test_the_diversity_table_shows_never_routed_experts():
    study = config(seeds=[0, 1], experiments={"diversity": {"methods": ["moe_4x1", "mose"]}})
    runs = {RunSpec("moe_4x1", 1.0, None, s): {**result(50.0), "expert_similarity": 0.8,
                                               "never_routed_experts": 1, "routed_experts": 12}
            for s in range(2)}
    runs |= {RunSpec("mose", 1.0, 100, s): {**result(50.0), "never_routed_experts": 2 + s,
                                            "routed_experts": 12} for s in range(2)}
    table = diversity_table(study, runs)
    assert table["MoE 4×1"] == {"expert similarity": "0.8000 ± 0.0000", "never routed": "1 ± 0 of 12"}
    assert table["MoSE"]["never routed"] == "2.5 ± 0.7 of 12"
    json.dumps(table)  # results.json holds it
