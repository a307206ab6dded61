"""Which shipped rule set `mose annotate` picks when no --rules is given."""

import pytest

from mose.data import Sample, read_jsonl
from mose.data.world import generate
from mose.skills.shipped import explain_sources, shipped_rules_for, source_of


def sample(sample_id: str, **meta) -> Sample:
    return Sample(id=sample_id, images=[], question="q?", answer="a", meta=meta or None)


@pytest.mark.parametrize("domain", ["driving", "robot"])
def test_world_records_get_their_domains_rules(tmp_path, domain):
    samples = list(read_jsonl(generate(domain, 5, seed=0, out=tmp_path)))
    assert shipped_rules_for(samples) == f"world-{domain}"


@pytest.mark.parametrize("record, rules", [
    (sample("coda/test_0001/region/1", source="coda-lm"), "coda-lm"),
    (sample("coda/vqa/region_perception/7"), "coda-lm"),
    (sample("robo2vlm/12", source="robo2vlm"), "robo2vlm"),
    (sample("drivelm/abc/perception/0", source="drivelm"), "drivelm"),
    (sample("renamed/1", source="drivelm"), "drivelm"),  # metadata alone is enough
    (sample("world/x/1", domain="robot"), "world-robot"),
    (sample("mine/1"), None),
])
def test_sources_from_ids_and_metadata(record, rules):
    assert source_of(record) == rules


def test_a_taxonomy_with_its_own_rules_gets_them(tmp_path):
    samples = list(read_jsonl(generate("driving", n=4, seed=0, out=tmp_path)))
    assert shipped_rules_for(samples, "driving-question") == "world-driving-question"
    assert shipped_rules_for(samples, "driving") == "world-driving"


def test_mixed_or_unknown_sources_pick_nothing():
    coda, mine = sample("coda/a/general"), sample("mine/1")
    assert shipped_rules_for([coda, sample("robo2vlm/1")]) is None
    assert shipped_rules_for([coda, mine]) is None
    assert shipped_rules_for([]) is None
    assert explain_sources([coda, mine, mine]) == "coda-lm (1), unknown (2)"


def test_annotate_without_rules_uses_the_matching_shipped_set(tmp_path):
    from typer.testing import CliRunner

    from mose.cli import app

    data = generate("driving", 12, seed=0, out=tmp_path / "world")
    out = tmp_path / "labelled.jsonl"
    result = CliRunner().invoke(app, ["annotate", "--taxonomy", "driving", "--data", str(data),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "'world-driving'" in result.output
    assert [s.skills for s in read_jsonl(out)] == [s.skills for s in read_jsonl(data)]

    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"id": "mine/1", "images": [], "question": "q?", "answer": "a"}\n')
    result = CliRunner().invoke(app, ["annotate", "--taxonomy", "driving", "--data", str(mine),
                                      "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "unknown (1)" in result.output and "--rules" in result.output
    assert not (tmp_path / "o.jsonl").exists()
