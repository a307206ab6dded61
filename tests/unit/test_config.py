import json

import pytest

from mose import MoSEConfig, Taxonomy, TokenMoEConfig, load_taxonomy
from mose.config import config_from_dict, resolve_layers


def test_builtin_taxonomies_have_the_paper_levels_and_general_everywhere():
    driving, robot = load_taxonomy("driving"), load_taxonomy("robot")
    assert driving.level_names == ("perception", "prediction", "planning")
    assert robot.level_names == ("perception", "interpretation", "planning")
    for taxonomy in (driving, robot):
        assert all("general" in level.skills for level in taxonomy.levels)


def test_skill_label_encoding_fills_missing_levels_with_general():
    taxonomy = load_taxonomy("driving")
    indices = taxonomy.encode({"perception": "vru", "planning": "yield"})
    assert taxonomy.decode(indices) == {
        "perception": "vru", "prediction": "general", "planning": "yield"}
    with pytest.raises(ValueError, match="unknown skill 'flying'"):
        taxonomy.encode({"perception": "flying"})
    with pytest.raises(ValueError, match="unknown level"):
        taxonomy.encode({"reasoning": "general"})


def test_user_taxonomy_from_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nlevels:\n  - name: perception\n    skills: [general, dog]\n"
                    "  - name: planning\n    skills: {general: x, bark: y}\n")
    taxonomy = load_taxonomy(path)
    assert taxonomy.level("planning").skills == ("general", "bark")
    assert Taxonomy.from_dict(taxonomy.to_dict()) == taxonomy


@pytest.mark.parametrize("text, match", [
    ("name: x\nlevels:\n  - name: perception\n    skills: [dog]\n", "lacks the 'general'"),
    ("name: x\nlevels: []\n", "no levels"),
    ("just a string\n", "not a taxonomy"),
    ("levels: [unclosed\n", "invalid YAML"),
])
def test_bad_taxonomy_files_name_the_file_and_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_taxonomy(path)


def test_unknown_taxonomy_name():
    with pytest.raises(ValueError, match="unknown taxonomy 'flying'"):
        MoSEConfig(taxonomy="flying")


def test_configs_round_trip_through_json(tmp_path):
    for cfg in (MoSEConfig(taxonomy="robot", layers=[1, 3, 5], top_k=2, modality_groups=True),
                TokenMoEConfig(num_experts=8, shared_expert=True, aux_loss_coef=0.1)):
        text = cfg.to_json(tmp_path / "cfg.json")
        assert json.loads(text)["kind"] == cfg.kind
        assert type(cfg).from_json(tmp_path / "cfg.json") == cfg
        assert config_from_dict(json.loads(text)) == cfg


@pytest.mark.parametrize("make, match", [
    (lambda: MoSEConfig(top_k=0), "top_k"),
    (lambda: MoSEConfig(top_k=6), "larger than the 5 skills"),
    (lambda: MoSEConfig(layers="most"), "layers must be"),
    (lambda: MoSEConfig(layers=[0, 0, 2]), "repeats"),
    (lambda: MoSEConfig(decode_routing="sometimes"), "decode_routing"),
    (lambda: TokenMoEConfig(num_experts=4, top_k=5), "top_k"),
    (lambda: TokenMoEConfig(aux_loss_coef=-1), "aux_loss_coef"),
    (lambda: MoSEConfig.from_dict({"kind": "mose", "topk": 1}), "unknown field"),
    (lambda: MoSEConfig.from_dict({"kind": "token_moe"}), "cannot load"),
])
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layers_resolve_and_split_into_levels_evenly_with_earlier_levels_larger():
    assert resolve_layers("even", 28) == list(range(0, 28, 2))
    assert resolve_layers("odd", 5) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([0, 9], 6)
    levels = MoSEConfig().level_of_layers(resolve_layers("even", 28))  # 14 MoSE layers
    sizes = [list(levels.values()).count(level) for level in range(3)]
    assert sizes == [5, 5, 4]
    assert [levels[i] for i in (0, 8, 10, 18, 20, 26)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="cannot cover the 3 levels"):
        MoSEConfig().level_of_layers([0, 2])
