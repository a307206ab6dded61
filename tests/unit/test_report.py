"""The report's jinja2 template: autoescaped, self-contained, the routing table with its probe ceiling."""

from __future__ import annotations

import re

import numpy as np

from mose.eval.analysis import LayerSimilarity, LevelRouting, ModelAnalysis, RoutingStats, SampleView
from mose.eval.report import render_report, write_report

SCRIPT = "<script>alert('x')</script>"


def routed_model(probes: dict[int, float]) -> ModelAnalysis:
    """A MoSE analysis by hand: one level of two skills, 12 labelled samples, 9 routed right."""
    level = LevelRouting("perception", ("general", "vru"), chosen=[6, 6], labelled=[6, 6],
                         confusion=[[5, 1], [2, 4]], mean_prob=0.75, probe_by_layer=probes)
    similarity = [LayerSimilarity(0, "perception", ("shared", "general", "vru"), np.eye(3))]
    return ModelAnalysis("runs/<mose>", "mose", similarity, RoutingStats(12, 12, [level], chain_matches=9))


def test_text_is_escaped_by_the_template(tmp_path):
    view = SampleView(id="s<1>", images=[str(tmp_path / "missing.png")], question=f"what {SCRIPT}?",
                      choices=["<b>go</b>", "stop"], reference="A. <b>go</b>", answer=SCRIPT, verdict="wrong")
    page = write_report(tmp_path, title=f"t {SCRIPT}", samples=[view], sources={"data": SCRIPT},
                        models=[routed_model({})]).read_text(encoding="utf-8")
    assert "<script" not in page and "<b>" not in page  # every value escaped, once
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert page.count(escaped) == 5  # the title twice, the source, the question, the answer
    assert "<h3>runs/&lt;mose&gt;</h3>" in page and '<p class="id">s&lt;1&gt;</p>' in page
    assert "image not readable:" in page and '<span class="badge bad">wrong</span>' in page
    assert "body{font:14px" in page  # the stylesheet is inlined as written (literal, not escaped)


def test_routing_table_shows_the_probe_ceiling_or_a_dash():
    page = render_report(models=[routed_model({0: 0.875, 1: 0.9})])
    row = re.search(r"<tr><th>perception</th>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>(.*?)</td>", row) == ["75.0%", "90.0%", "0.75", "12"]
    assert "<th>level</th><th>router accuracy</th><th>linear-probe ceiling</th>" in page
    assert "per layer: perception: layer 0 87.5%, layer 1 90.0%" in page
    unprobed = render_report(models=[routed_model({})])
    row = re.search(r"<tr><th>perception</th>(.*?)</tr>", unprobed).group(1)
    assert re.findall(r"<td>(.*?)</td>", row)[1] == "—" and "per layer" not in unprobed


def test_sections_and_nav_follow_what_is_given():
    empty = render_report()
    assert "nothing to report." in empty and "<section" not in empty
    page = render_report(models=[routed_model({})], figures={"a figure": b"\x89PNG"})
    anchors = re.findall(r'<a href="#(\w+)">', page)
    assert anchors == ["figures", "experts", "routing"]
    assert re.findall(r'<section id="(\w+)">', page) == anchors
