"""`mose analyze`: expert similarity, routing statistics and probe ceilings, the HTML report (it renders)."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mose
from conftest import mose_blocks, prompt_batch, sharpen_routers
from mose.cli import app
from mose.data import DataError, Sample, read_jsonl
from mose.data.world import generate
from mose.eval import analysis
from mose.eval.analysis import (
    MIN_PROBE_SAMPLES,
    AnalysisError,
    analyze_model,
    expert_similarity,
    probe_by_layer,
    route_samples,
    route_with_inputs,
    routing_stats,
)
from mose.eval.analyze import analyze
from mose.eval.report import routing_table, score_tables, write_report
from mose.eval.score import score, write_scores
from mose.models.processor import save_processor
from mose.routing import SkillChain, SkillChoice

DRIVING = mose.load_taxonomy("driving")
ROBOT = mose.load_taxonomy("robot")
SECTIONS = ("scores", "experts", "routing", "samples")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate("driving", n=16, seed=0, out=tmp_path_factory.mktemp("world"))


def converted(tiny, cfg):
    """A converted copy of the session's tiny Qwen2-VL (built once by conftest's `tiny`)."""
    model, processor = tiny("qwen2_vl")
    return mose.convert(model, cfg), processor


def save(model, processor, path):
    model.save_pretrained(path)
    save_processor(processor, path)
    return path


def chain(*skills: str, prob: float = 0.5) -> SkillChain:
    return SkillChain(tuple(SkillChoice(level, skill, prob, ())
                            for level, skill in zip(DRIVING.level_names, skills, strict=True)))


def test_upcycled_experts_are_copies_until_one_is_perturbed(tiny):
    model, _ = converted(tiny, mose.MoSEConfig(taxonomy="driving"))
    layers = expert_similarity(model)
    assert [(s.layer, s.level) for s in layers] == [(0, "perception"), (2, "prediction"), (4, "planning")]
    assert layers[0].labels == ("shared", *DRIVING.levels[0].skills)
    for layer in layers:
        assert layer.matrix.shape == (6, 6)
        assert (layer.matrix == 1.0).all()  # every expert (shared too) is a copy of the FFN

    block = mose_blocks(model)[0]
    vru = 1 + DRIVING.levels[0].index("vru")  # row of the vru expert: after "shared"
    with torch.no_grad():
        block.experts.down_proj[vru - 1].add_(torch.randn_like(block.experts.down_proj[0]) * 0.05)
    after = expert_similarity(model)[0].matrix
    others = [i for i in range(6) if i != vru]
    assert (after[vru, others] < 1).all() and (after[others, vru] < 1).all()
    np.testing.assert_array_equal(after, after.T)
    assert (after[np.ix_(others, others)] == 1.0).all() and (np.diag(after) == 1.0).all()
    assert (expert_similarity(model)[1].matrix == 1.0).all()  # other layers untouched


def test_labels_for_modality_groups_and_token_moe(tiny):
    cfg = mose.MoSEConfig(taxonomy="driving", modality_groups=True, shared_expert=False)
    grouped, _ = converted(tiny, cfg)
    labels = expert_similarity(grouped)[0].labels
    assert labels[:4] == ("image:general", "text:general", "image:vehicle", "text:vehicle")
    assert len(labels) == 10 and "shared" not in labels
    moe, _ = converted(tiny, mose.TokenMoEConfig(num_experts=4, shared_expert=True))
    layer = expert_similarity(moe)[0]
    assert layer.labels == ("shared", "e0", "e1", "e2", "e3") and layer.level is None
    assert layer.title == "layer 0"


def test_a_dense_model_has_no_experts(tiny, tmp_path):
    dense, processor = tiny("qwen2_vl")
    with pytest.raises(AnalysisError, match="dense model has no experts"):
        expert_similarity(dense, "my-dense")
    path = save(dense, processor, tmp_path / "dense")
    with pytest.raises(AnalysisError, match=r"dense.*qwen2_vl.*no experts"):
        analyze(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_routing_stats_by_hand():
    samples = [
        Sample("a", [], "q", skills={"perception": "vru", "prediction": "crossing", "planning": "yield"}),
        Sample("b", [], "q", skills={"perception": "vru"}),  # missing levels are general
        Sample("c", [], "q", skills={"perception": "vehicle", "prediction": "oncoming", "planning": "stop"}),
        Sample("d", [], "q", skills=None),  # unlabelled: counted as chosen only
    ]
    chains = [chain("vru", "crossing", "yield", prob=0.9), chain("vru", "general", "keep", prob=0.7),
              chain("vru", "oncoming", "stop", prob=0.8), chain("obstacle", "general", "general", prob=0.6)]
    stats = routing_stats(chains, samples, DRIVING)
    assert (stats.n, stats.n_labelled, stats.chain_matches) == (4, 3, 1)
    assert stats.chain_accuracy == pytest.approx(1 / 3)
    perception = stats.level("perception")
    assert perception.accuracy == pytest.approx(2 / 3)
    assert dict(zip(perception.skills, perception.chosen, strict=True)) == {
        "general": 0, "vehicle": 0, "vru": 3, "traffic_control": 0, "obstacle": 1}
    assert perception.labelled == [0, 1, 2, 0, 0]
    vehicle, vru = perception.skills.index("vehicle"), perception.skills.index("vru")
    assert perception.confusion[vehicle][vru] == 1 and perception.confusion[vru][vru] == 2
    assert stats.level("prediction").accuracy == pytest.approx(1.0)
    assert stats.level("planning").accuracy == pytest.approx(2 / 3)
    assert perception.mean_prob == pytest.approx(0.75)
    json.dumps(stats.to_dict())  # the numbers are plain JSON

    bad = [Sample("e", [], "q", skills={"perception": "unicorn"})]
    with pytest.raises(DataError, match=r"data\.jsonl, record e, field 'skills'.*unicorn"):
        routing_stats([chain("vru", "general", "general")], bad, DRIVING, source="data.jsonl")


def force_routers(model, skills: dict[str, str]):
    """Router output hooks: whatever the input, the given skill of each level wins."""
    taxonomy = model.mose_config.taxonomy
    handles = []
    for block in mose_blocks(model):
        level = taxonomy.levels[block.level]
        winner = level.index(skills[level.name])

        def fixed(_module, _args, logits, winner=winner):
            out = torch.zeros_like(logits)
            out[:, winner] = 10.0
            return out

        handles.append(block.router.register_forward_hook(fixed))
    return handles


def test_router_accuracy_equals_a_hand_count_when_routers_are_forced(tiny, world):
    model, processor = converted(tiny, mose.MoSEConfig(taxonomy="driving"))
    samples = list(read_jsonl(world))
    labels = [DRIVING.decode(DRIVING.encode(s.skills)) for s in samples]
    # The most common labelled skill per level: a forced router gets exactly those right.
    forced = {lv: Counter(label[lv] for label in labels).most_common(1)[0][0] for lv in DRIVING.level_names}
    force_routers(model, forced)
    result = analyze_model(model, processor, samples, batch_size=5, progress=False)
    stats = result.routing
    for level in DRIVING.level_names:
        by_hand = sum(label[level] == forced[level] for label in labels) / len(samples)
        assert stats.level(level).accuracy == pytest.approx(by_hand)
        lv = stats.level(level)
        assert lv.chosen[lv.skills.index(forced[level])] == len(samples)
    # Labels never reach the model: forced by them, every route would equal its label.
    assert any(stats.level(level).accuracy < 1 for level in DRIVING.level_names)
    whole = sum(label == forced for label in labels) / len(samples)
    assert stats.chain_accuracy == pytest.approx(whole)
    assert all(result.chains[s.id].as_dict() == forced for s in samples)


def test_routes_do_not_depend_on_batch_size(tiny, world):
    model, processor = converted(tiny, mose.MoSEConfig(taxonomy="driving"))
    samples = list(read_jsonl(world))[:8]
    sharpen_routers(model, seed=1, spread=prompt_batch(processor, samples))
    one = route_with_inputs(model, processor, samples, batch_size=1, progress=False)
    many = route_with_inputs(model, processor, samples, batch_size=8, progress=False)
    assert [c.as_dict() for c in one.chains] == [c.as_dict() for c in many.chains]
    assert [c.as_dict() for c in route_samples(model, processor, samples[:3], progress=False)] == [
        c.as_dict() for c in many.chains[:3]]
    assert len({str(c.as_dict()) for c in many.chains}) > 1  # sharp routers really spread the samples
    # The pooled router inputs too: one (N, H) per MoSE layer, whatever the batch.
    assert sorted(many.inputs) == sorted(model.level_of_layer) == sorted(one.inputs)
    for layer, x in many.inputs.items():
        assert x.shape == (8, model.config.text_config.hidden_size) and x.dtype == torch.float32
        torch.testing.assert_close(one.inputs[layer], x, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    """36 robot-world samples, 6 of them unlabelled, without their images.

    The robot world's question templates alone fix the skills, and text-only
    prompts route ~10x faster on CPU.
    """
    path = generate("robot", n=36, seed=0, out=tmp_path_factory.mktemp("robot"))
    return [dataclasses.replace(s, images=[], skills=None if i % 6 == 5 else s.skills)
            for i, s in enumerate(read_jsonl(path))]


def test_probe_ceiling_per_level_on_the_router_inputs(tiny, robot):
    model, processor = converted(tiny, mose.MoSEConfig(taxonomy="robot"))
    threads = torch.get_num_threads()
    stats = analyze_model(model, processor, robot, batch_size=8, progress=False).routing
    assert torch.get_num_threads() == threads  # the probes ran on one thread, then gave the rest back
    assert (stats.n, stats.n_labelled) == (36, 30)
    for i, level in enumerate(stats.levels):
        assert sorted(level.probe_by_layer) == [k for k, lv in model.level_of_layer.items() if lv == i]
        assert sum(1 for n in level.labelled if n) >= 2  # a real choice for the probe to make
        # Measured 0.97, 0.93, 1.0 (perception, interpretation, planning) where the random
        # routers score 0.23-0.47: the labels are linear in what the routers read.
        assert level.probe_accuracy >= 0.8 > level.accuracy
        assert level.probe_accuracy == max(level.probe_by_layer.values())
    by_level = stats.to_dict()["by_level"]
    assert by_level["planning"]["probe_by_layer"] == {"4": stats.level("planning").probe_accuracy}
    json.dumps(by_level)


def test_too_few_labels_leave_the_probe_out():
    x = torch.randn(MIN_PROBE_SAMPLES - 1, 4)  # (N, H)
    labels = torch.zeros(MIN_PROBE_SAMPLES - 1, 3, dtype=torch.long)  # (N, L)
    assert probe_by_layer({0: x}, labels, {0: 0}, ROBOT) == {}
    samples = [Sample("a", [], "q", skills={"perception": "vru"})]
    stats = routing_stats([chain("vru", "general", "general")], samples, DRIVING)
    assert stats.level("perception").probe_accuracy is None
    assert stats.to_dict()["by_level"]["perception"]["probe_accuracy"] is None
    table = routing_table(stats)
    assert table.columns[:2] == ["router accuracy", "linear-probe ceiling"]
    assert table.rows[0] == ("perception", ["100.0%", None, 0.5, 1])


def test_score_tables_read_nested_scores_and_methods():
    scores = {"overall": 50.0, "n": 4,
              "by_level": {"perception": {"accuracy": 50.0, "n": 2}, "planning": {"accuracy": 50.0, "n": 2}},
              "by_skill": {"perception": {"vru": {"accuracy": 100.0, "n": 1}}},
              "routing": {"n": 4, "chain": 25.0, "by_level": {"perception": 75.0}}}
    tables = {t.title: t for t in score_tables("world", scores)}
    assert tables["world"].rows == [("all", [50.0, 4])]
    assert tables["world · by_level"].columns == ["accuracy", "n"]
    assert [label for label, _ in tables["world · by_level"].rows] == ["perception", "planning"]
    assert tables["world · by_skill"].rows == [("perception › vru", [100.0, 1])]
    methods = score_tables("study", {"methods": {"MoSE": {"acc": 61.0, "cost": {"gflops": 1.5}},
                                                 "MoE": {"acc": 48.5}}})
    assert len(methods) == 1 and methods[0].columns == ["acc", "cost › gflops"]
    assert methods[0].rows == [("MoSE", [61.0, 1.5]), ("MoE", [48.5, None])]


@pytest.fixture(scope="module")
def analyzed(tiny, tmp_path_factory, world):
    """`mose analyze`'s report and printout: a MoSE model (an expert perturbed) against token MoE."""
    root = tmp_path_factory.mktemp("analysis")
    model, processor = converted(tiny, mose.MoSEConfig(taxonomy="driving"))
    with torch.no_grad():
        mose_blocks(model)[1].experts.gate_up_proj[2].mul_(-1.0).add_(0.01)
    save(model, processor, root / "mose")
    baseline, _ = converted(tiny, mose.TokenMoEConfig(num_experts=4))
    save(baseline, processor, root / "moe")
    samples = list(read_jsonl(world))
    predictions = root / "pred.jsonl"
    predictions.write_text("".join(json.dumps({
        "id": s.id, "answer": s.answer if i % 2 else "no idea",
        "skill_chain": {"perception": {"skill": "vru", "prob": 0.93},
                        "prediction": {"skill": "crossing", "prob": 0.88},
                        "planning": {"skill": "yield", "prob": 0.95}}}) + "\n"
        for i, s in enumerate(samples)))
    write_scores(root / "world.json", score("world", predictions, world))
    (root / "study.json").write_text(json.dumps({"methods": {"MoSE": {"accuracy": 61.0},
                                                             "MoE 4x1": {"accuracy": 48.5}}}))
    result = CliRunner().invoke(app, [
        "analyze", "--model", str(root / "mose"), "--out", str(root / "out"), "--compare", str(root / "moe"),
        "--data", str(world), "--pred", str(predictions), "--scores", str(root / "world.json"),
        "--scores", str(root / "study.json"), "--max-samples", "4", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    return root / "out" / "report.html", result.output


@pytest.fixture(scope="module")
def report(analyzed):
    return analyzed[0]


def test_router_accuracy_beside_its_probe_ceiling(analyzed):
    report, printed = analyzed
    numbers = json.loads((report.parent / "analysis.json").read_text())
    by_level = numbers["models"][0]["routing"]["by_level"]
    page = report.read_text(encoding="utf-8")
    page = page[page.index('<section id="routing">'):]
    assert "<th>linear-probe ceiling</th>" in page
    assert "linear-probe ceiling per layer: perception: layer 0" in page
    for level in DRIVING.level_names:
        probe = by_level[level]["probe_accuracy"]  # 16 labelled samples: probed
        assert 0 <= probe <= 1
        row = re.search(rf"<tr><th>{level}</th>(.*?)</tr>", page).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert cells[:2] == [f"{100 * by_level[level]['accuracy']:.1f}%", f"{100 * probe:.1f}%"]
        assert f"{100 * probe:.1f}%" in printed  # the CLI's summary table
    assert "whole chain" in printed and "wrote " in printed


def test_report_has_every_section_and_only_embedded_images(report):
    page = report.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'id="{section}"' in page
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) >= 2 + 2 + 4  # two heatmap figures, routing plots, four sample images
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)  # nothing fetched from elsewhere
    assert "perception: vru (0.93) → prediction: crossing (0.88) → planning: yield (0.95)" in page
    assert "MoE 4x1" in page and "world · by_level" in page
    # Both files, and no temporary file left beside them.
    assert sorted(p.name for p in report.parent.iterdir()) == ["analysis.json", "report.html"]


def test_analysis_json_holds_the_numbers(report):
    numbers = json.loads((report.parent / "analysis.json").read_text())
    mose_model, baseline = numbers["models"]
    assert (mose_model["kind"], baseline["kind"]) == ("mose", "token_moe")
    prediction = mose_model["similarity"][1]
    assert prediction["level"] == "prediction" and prediction["min_routed_similarity"] < 0
    assert mose_model["similarity"][0]["mean_routed_similarity"] == 1.0
    assert mose_model["routing"]["n"] == 16 and baseline["routing"] is None
    assert set(mose_model["routing"]["by_level"]) == set(DRIVING.level_names)
    assert set(numbers["scores"]) == {"world", "study"} and len(numbers["samples"]) == 4


def test_a_demo_can_write_a_methods_table_alone(tmp_path):
    path = write_report(tmp_path, title="study", scores={"world test": {"methods": {
        "MoSE": {"accuracy": 61.0}, "dense SFT": {"accuracy": 52.25}}}})
    page = path.read_text()
    assert "dense SFT" in page and "52.25" in page and 'id="experts"' not in page


def test_bad_inputs_are_clear_errors(tiny, tmp_path, world):
    model, processor = converted(tiny, mose.MoSEConfig(taxonomy="driving"))
    path = save(model, processor, tmp_path / "mose")
    with pytest.raises(AnalysisError, match="predictions need --data"):
        analyze(path, tmp_path / "out", predictions=tmp_path / "p.jsonl")
    stray = tmp_path / "p.jsonl"
    stray.write_text(json.dumps({"id": "elsewhere/1", "answer": "stop", "skill_chain": None}) + "\n")
    with pytest.raises(AnalysisError, match="none of its 1 prediction ids"):
        analyze(path, tmp_path / "out", data=world, predictions=stray)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(AnalysisError, match=r"bad\.json: expected a JSON object"):
        analyze(path, tmp_path / "out", scores=[tmp_path / "bad.json"])
    assert not (tmp_path / "out").exists()


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if (found := shutil.which(name))), None)


# After load, list the images that did not decode; a canary that cannot decode proves the check works.
PROBE = """<img id="canary" src="data:image/png;base64,AAAA" alt="">
<script>window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  document.body.dataset.images = document.images.length;
  document.body.dataset.broken = broken.map(i => i.id || "report").join(",");
});</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    probe = tmp_path / "probe.html"
    page = report.read_text(encoding="utf-8")
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    images = re.search(r'data-images="(\d+)"', dom)
    broken = re.search(r'data-broken="([^"]*)"', dom)
    assert images and broken, "the probe script did not run"
    assert int(images.group(1)) >= 9
    assert broken.group(1) == "canary"  # every image of the report decoded


def test_analysis_report_analyze_import_one_way():
    """The three modules import in one order only, analysis <- report <- analyze (a DAG),
    each at module level: an import from a lower module back up (even deferred in a function,
    or by name through importlib) would bring the old circle back."""
    order = ["mose.eval.analysis", "mose.eval.report", "mose.eval.analyze"]  # lower first
    for rank, module in enumerate(order):
        path = analysis.__file__.replace("analysis.py", module.rsplit(".", 1)[1] + ".py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "mose.eval" if node.level else node.module or ""  # relative: this package
                base = f"{base}.{node.module}" if node.level and node.module else base
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [node.args[0].value]
            else:
                continue
            for target in set(names) & set(order):
                assert order.index(target) < rank, f"{module} imports {target}: up the DAG {order}"
                assert node in top, f"{module} imports {target} inside a function, not at module level"
