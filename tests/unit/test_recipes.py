"""The shipped recipes as package data: listed, found by name, copied out and loaded from the copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mose.recipes_cli import recipes_app
from mose.study import StudyError, load_study
from mose.train import RecipeError, load_recipe
from mose.train.shipped import RECIPES, copy_recipe, list_recipes, recipe_kind, recipe_path

ROOT = Path(__file__).parents[2]
runner = CliRunner()


def load(name_or_path, kind: str):
    """A shipped file loaded as its kind reads it (studies: loaded and checked, never run)."""
    if kind == "study":
        return load_study(name_or_path, ["model=/models/Qwen2-VL-2B-Instruct"]
                          if "real/" in str(name_or_path) else [])
    if kind == "accelerate":
        return yaml.safe_load(recipe_path(name_or_path).read_text())
    return load_recipe(name_or_path)


@pytest.fixture(autouse=True)
def judge(monkeypatch):
    monkeypatch.setenv("MOSE_JUDGE_BASE_URL", "http://localhost:1/v1")  # the CODA-LM study's judge


def test_the_listing_names_every_runnable_file_and_no_base():
    names = list_recipes()
    assert {"demo", "coda-lm/mose", "robo2vlm/mose-lora", "study/driving", "study/real/coda-lm",
            "accelerate/ddp"} <= set(names)
    assert not [n for n in names if "_base" in n]
    files = [p for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_")]
    assert len(names) == len(files) == 21


def test_the_repository_configs_folder_is_the_shipped_one():
    assert (ROOT / "configs").resolve() == RECIPES
    assert (ROOT / "configs" / "coda-lm" / "_base.yaml").is_file()


@pytest.mark.parametrize("name", list_recipes())
def test_every_listed_recipe_loads_by_name(name):
    kind = recipe_kind(name)
    loaded = load(name, kind)
    assert load(f"{name}.yaml", kind) == loaded  # with or without .yaml
    if kind == "accelerate":
        assert loaded["distributed_type"]
    else:
        assert loaded.source == str(RECIPES / f"{name}.yaml")


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("model: tiny:qwen2_vl\noutput_dir: mine\nstages: {convert: "
                                   "{mose: {taxonomy: driving}}}\n")
    assert recipe_path("demo") == Path("demo")
    assert load_recipe("demo").output_dir == "mine"
    assert load_recipe("demo.yaml").output_dir == "runs/train/mose"  # no such file here: shipped


def test_an_unknown_name_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match="did you mean coda-lm/mose"):
        recipe_path("coda-lm/mose-lroa")
    with pytest.raises(ValueError, match="no such file"):  # outside the recipes folder: not shipped
        recipe_path("../skills/taxonomies/driving")
    with pytest.raises(RecipeError, match="study/driving"):
        load_recipe("driving")
    with pytest.raises(StudyError, match="did you mean study/driving"):
        load_study("study/drivng")
    with pytest.raises(ValueError, match="not a shipped recipe"):
        copy_recipe("../skills/taxonomies/driving", tmp_path)


def test_a_family_copies_and_loads_from_the_copy(tmp_path):
    copied = copy_recipe("coda-lm", tmp_path)
    assert sorted(p.name for p in copied) == sorted(p.name for p in (RECIPES / "coda-lm").glob("*.yaml"))
    recipe = load_recipe(tmp_path / "mose-lora.yaml")
    assert recipe.source == str(tmp_path / "mose-lora.yaml") and recipe.model == "Qwen/Qwen2-VL-2B-Instruct"
    assert recipe.stages["convert"].mose["experts"] == "lora"


def test_one_recipe_copies_with_its_chain_of_bases(tmp_path):
    copied = copy_recipe("study/real/robo2vlm.yaml", tmp_path)
    assert sorted(p.name for p in copied) == ["coda-lm.yaml", "robo2vlm.yaml"]
    study = load_study(tmp_path / "robo2vlm.yaml", ["model=/models/Qwen2-VL-2B-Instruct"])
    assert study.score == "robo2vlm" and study.recipe["mixed_precision"] == "auto"  # from its base
    assert [p.name for p in copy_recipe("coda-lm/mose", tmp_path / "one")] == ["_base.yaml", "mose.yaml"]
    assert load_recipe(tmp_path / "one" / "mose.yaml").stages


def test_all_keeps_the_layout(tmp_path):
    copied = copy_recipe("all", tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in copied} == {
        p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml")}
    assert load_study(tmp_path / "study" / "robot.yaml").world.domain == "robot"


def test_a_copy_will_not_overwrite_unless_asked(tmp_path):
    (tmp_path / "mose.yaml").write_text("# mine\n")
    with pytest.raises(FileExistsError, match="overwrite"):
        copy_recipe("coda-lm/mose", tmp_path)
    assert (tmp_path / "mose.yaml").read_text() == "# mine\n"
    assert not (tmp_path / "_base.yaml").exists()  # nothing copied when anything would be replaced
    copy_recipe("coda-lm/mose", tmp_path, overwrite=True)
    assert load_recipe(tmp_path / "mose.yaml").output_dir == "runs/coda-lm/mose"


def test_the_cli_lists_and_copies(tmp_path):
    result = runner.invoke(recipes_app, ["list"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("coda-lm/mose", "study/driving", "accelerate/ddp", "train recipe", "study", "accelerate",
                 "The demo's MoSE run"):
        assert text in result.output
    result = runner.invoke(recipes_app, ["copy", "demo", str(tmp_path)])
    assert result.exit_code == 0 and (tmp_path / "demo.yaml").is_file()
    result = runner.invoke(recipes_app, ["copy", "demo", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(recipes_app, ["copy", "demo", str(tmp_path), "--overwrite"])
    assert result.exit_code == 0
    result = runner.invoke(recipes_app, ["copy", "dmeo", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 2 and "did you mean demo" in result.output
    result = runner.invoke(recipes_app, ["path", "accelerate/ddp"])
    assert result.exit_code == 0 and Path(result.output.strip()) == RECIPES / "accelerate" / "ddp.yaml"
