"""Predictions with skill chains: file format, resume, route-aware batching, chat, CODA-LM files."""

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import mose
from conftest import distinct_experts, mose_blocks, prompt_batch, sharpen_routers
from mose.data import DataError, Sample, read_jsonl
from mose.data.world import generate
from mose.eval.batching import (
    current_route_keys,
    is_mose,
    plain_batches,
    route_aware_batches,
    route_keys,
)
from mose.eval.chat import NO_CHAIN, answer_one, format_chain
from mose.eval.coda_lm import write_coda_lm_answers
from mose.eval.predict import Answerer, GenerationOptions, partial_path, predict
from mose.eval.predictions import Prediction, read_predictions
from mose.eval.regroup import RouteGroupDecoder
from mose.models.loading import load_model
from mose.models.processor import save_processor
from mose.routing import SkillChain, SkillChoice

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return list(read_jsonl(generate("robot", 12, seed=0, out=tmp_path_factory.mktemp("robot"))))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, samples):
    """A converted tiny Qwen2-VL with sharp random routers (spread over the 12 robot samples),
    saved and loaded like a checkpoint."""
    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model, mose.MoSEConfig(taxonomy="robot"))
    distinct_experts(model)  # route-aware batching must give each sample its own expert
    sharpen_routers(model, seed=3, spread=prompt_batch(processor, samples))
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    save_processor(processor, path)
    return load_model(str(path))


def run(model, processor, samples, out, **kwargs):
    return predict(model, processor, samples, out, batch_size=4, max_new_tokens=NEW_TOKENS,
                   progress=False, **kwargs)


def spy_on_generate(monkeypatch, model) -> list[tuple[int, list | None]]:
    """Per generate call: its batch size and each sample's route (None for non-MoSE models)."""
    calls = []
    original = model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs["input_ids"].shape[0], current_route_keys(model) if is_mose(model) else None))
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_predictions_file_is_one_line_per_sample_in_input_order(converted, samples, tmp_path,
                                                                 monkeypatch):
    model, processor = converted
    out = tmp_path / "pred.jsonl"
    report = run(model, processor, samples, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in samples]
    taxonomy = model.mose_config.taxonomy
    for row in rows:
        assert set(row) == {"id", "answer", "skill_chain"}
        assert isinstance(row["answer"], str) and row["answer"] == row["answer"].strip()
        assert list(row["skill_chain"]) == list(taxonomy.level_names)
        for level in taxonomy.levels:
            choice = row["skill_chain"][level.name]
            assert choice["skill"] in level.skills and 0 < choice["prob"] <= 1
    assert not partial_path(out).exists()
    assert (report.total, report.generated, report.resumed) == (12, 12, 0)
    assert report.routes >= 3

    calls = spy_on_generate(monkeypatch, model)  # a complete OUT is left alone
    before = out.read_text()
    again = run(model, processor, samples, out)
    assert calls == [] and again.generated == 0 and out.read_text() == before


@contextmanager
def decode_steps(model) -> Iterator[list[list]]:
    """Each cached decode step's routes, one per sample of its batch."""
    steps = []
    hook = model.register_forward_hook(
        lambda _m, _args, kwargs, _out: steps.append(current_route_keys(model))
        if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    try:
        yield steps
    finally:
        hook.remove()


def test_route_aware_batching_gives_plain_answers_with_one_route_per_decode_step(converted, samples,
                                                                                 tmp_path, monkeypatch):
    model, processor = converted
    prefills = spy_on_generate(monkeypatch, model)
    with decode_steps(model) as aware:
        report = run(model, processor, samples, tmp_path / "aware.jsonl")
    assert [size for size, _ in prefills] == [4, 4, 4]  # plain batches, no routing pass
    with decode_steps(model) as plain:
        run(model, processor, samples, tmp_path / "plain.jsonl", route_aware=False)
    assert aware and all(len(set(routes)) == 1 for routes in aware)
    assert any(len(set(routes)) > 1 for routes in plain)  # the samples really spread
    assert report.routes >= 3 and report.batches >= report.routes
    assert (tmp_path / "aware.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()


def test_resume_generates_only_the_missing_ids(converted, samples, tmp_path, monkeypatch):
    model, processor = converted
    full = tmp_path / "full.jsonl"
    run(model, processor, samples, full, route_aware=False)
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    # As a kill leaves it: the first batch and a half-written line.
    partial_path(out).write_text("".join(lines[:5]) + lines[5][:17])
    calls = spy_on_generate(monkeypatch, model)
    report = run(model, processor, samples, out)
    assert (report.resumed, report.generated) == (5, 7)
    assert sum(size for size, _ in calls) == 7
    assert out.read_text() == full.read_text()
    assert not partial_path(out).exists()


def test_foreign_partial_and_incomplete_output_are_errors(converted, samples, tmp_path):
    model, processor = converted
    out = tmp_path / "pred.jsonl"
    partial_path(out).write_text('{"id": "elsewhere/1", "answer": "A", "skill_chain": null}\n')
    with pytest.raises(ValueError, match="'elsewhere/1' is not in the input"):
        run(model, processor, samples, out)
    partial_path(out).write_text('{"id": "robot/1", "answer"\n{"id": "x"}\n')
    with pytest.raises(ValueError, match="pred.jsonl.partial, record at line 1: malformed JSON"):
        run(model, processor, samples, out)
    partial_path(out).unlink()
    out.write_text(json.dumps({"id": samples[0].id, "answer": "A", "skill_chain": None}) + "\n")
    with pytest.raises(ValueError, match="lacks 11 of the 12 input ids"):
        run(model, processor, samples, out)
    with pytest.raises(ValueError, match="field 'id': the id repeats"):
        run(model, processor, samples[:2] * 2, tmp_path / "twice.jsonl")


@pytest.mark.parametrize("cfg", [None, mose.TokenMoEConfig(num_experts=4)])
def test_dense_and_token_moe_models_give_null_chains(tiny, samples, tmp_path, cfg):
    model, processor = tiny("qwen2_vl")
    if cfg is not None:
        model = mose.convert(model, cfg)
    out = tmp_path / "pred.jsonl"
    report = run(model, processor, samples[:5], out)  # route_aware=True is a no-op here
    predictions = read_predictions(out)
    assert list(predictions) == [s.id for s in samples[:5]]
    assert all(p.skill_chain is None for p in predictions.values())
    assert report.routes is None and report.batches == 2


def test_text_only_mose_model_with_top_2(tiny, tmp_path):
    model, tokenizer = tiny("qwen2")
    model = mose.convert(model, mose.MoSEConfig(top_k=2))
    sharpen_routers(model)
    questions = ["is the cone on the left?", "what should the ego car do?", "where is the bus?"]
    samples = [Sample(id=f"t{i}", images=[], question=q, choices=["yes", "no"] if i == 0 else None)
               for i, q in enumerate(questions)]
    run(model, tokenizer, samples, tmp_path / "aware.jsonl")
    run(model, tokenizer, samples, tmp_path / "plain.jsonl", route_aware=False)
    predictions = read_predictions(tmp_path / "aware.jsonl")
    assert list(predictions) == ["t0", "t1", "t2"]
    assert all(p.skill_chain is not None for p in predictions.values())
    assert (tmp_path / "aware.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()


def labelled_chain(sample, taxonomy):
    return {level: (sample.skills or {}).get(level, "general") for level in taxonomy.level_names}


def test_forced_skills_route_every_answer_by_its_records_labels(converted, samples, tmp_path):
    model, processor = converted
    taxonomy = model.mose_config.taxonomy
    run(model, processor, samples, tmp_path / "own.jsonl")
    own = read_predictions(tmp_path / "own.jsonl")
    with decode_steps(model) as steps:
        report = run(model, processor, samples, tmp_path / "forced.jsonl", force_skills=True)
    forced = read_predictions(tmp_path / "forced.jsonl")
    labels = {s.id: labelled_chain(s, taxonomy) for s in samples}
    assert {i: p.skills() for i, p in forced.items()} == labels  # the chains are the labels
    assert any(own[i].skills() != labels[i] for i in labels)  # ... which the routers alone do not pick
    # Route-aware batching groups by the forced routes: one route per decode step.
    assert steps and all(len(set(routes)) == 1 for routes in steps)
    assert report.routes == len({tuple(chain.values()) for chain in labels.values()})


def test_forced_skills_need_labels_on_every_record_and_a_mose_model(converted, tiny, samples, tmp_path):
    model, processor = converted
    out = tmp_path / "pred.jsonl"
    unlabelled = Sample(id="robot/unlabelled", images=[], question="q")
    with pytest.raises(DataError, match=r"test\.jsonl, record robot/unlabelled, field 'skills': "
                                        "force_skills routes each question by its labelled skill chain"):
        predict(model, processor, [*samples[:3], unlabelled], out, force_skills=True, source="test.jsonl",
                progress=False)
    unknown = Sample(id="robot/odd", images=[], question="q", skills={"perception": "smell"})
    with pytest.raises(DataError, match="record robot/odd, field 'skills'"):
        predict(model, processor, [unknown], out, force_skills=True, source="test.jsonl", progress=False)
    assert not out.exists() and not partial_path(out).exists()  # refused before any answer
    dense, processor = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="only a MoSE model has"):
        predict(dense, processor, samples[:1], out, force_skills=True, progress=False)


def test_missing_image_is_a_data_error_and_leaves_no_output(converted, samples, tmp_path):
    model, processor = converted
    gone = Sample(id="robot/gone", images=[str(tmp_path / "gone.png")], question="q")
    out = tmp_path / "pred.jsonl"
    with pytest.raises(DataError, match=r"test\.jsonl, record robot/gone, field 'images': cannot open"):
        predict(model, processor, [*samples[:3], gone], out, source="test.jsonl", progress=False)
    assert not out.exists()


def test_routing_pass_stops_after_the_last_router(converted, samples):
    model, processor = converted
    layers = model.mose_arch.layers(model)
    last = max(model.level_of_layer)
    ran = []
    handles = [layers[i].register_forward_hook(lambda *_, i=i: ran.append(i)) for i in range(len(layers))]
    try:
        inputs = Answerer(model, processor).inputs(samples[:4])
        keys = route_keys(model, inputs)
        assert ran == list(range(last))  # the last MoSE layer and those after it never run
        model(**inputs)
        assert current_route_keys(model) == keys
    finally:
        for handle in handles:
            handle.remove()


def test_batch_plans():
    assert plain_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert route_aware_batches(["a", "b", "a", "c", "a", "b"], 2) == [[0, 2], [4], [1, 5], [3]]
    with pytest.raises(ValueError, match="batch_size"):
        route_aware_batches(["a"], 0)


def test_answer_one_returns_the_skill_chain_and_formats_it(converted, tiny, samples):
    model, processor = converted
    answer, chain = answer_one(model, processor, samples[0].images[0], samples[0].question,
                               max_new_tokens=NEW_TOKENS)
    assert isinstance(answer, str) and isinstance(chain, SkillChain)
    assert [c.level for c in chain.choices] == list(model.mose_config.taxonomy.level_names)
    assert format_chain(chain) == str(chain)
    dense, dense_processor = tiny("qwen2_vl")
    assert answer_one(dense, dense_processor, None, "what is ahead?", max_new_tokens=2)[1] is None

    example = SkillChain(tuple(SkillChoice(level, skill, prob, ()) for level, skill, prob in [
        ("perception", "vru", 0.93), ("prediction", "crossing", 0.88), ("planning", "yield", 0.951)]))
    expected = "perception: vru (0.93) → prediction: crossing (0.88) → planning: yield (0.95)"
    assert format_chain(example) == expected
    as_json = {"perception": {"skill": "vru", "prob": 0.93},
               "prediction": {"skill": "crossing", "prob": 0.88},
               "planning": {"skill": "yield", "prob": 0.951}}
    assert format_chain(as_json) == expected
    assert format_chain(None) == NO_CHAIN


def coda_sample(sample_id, task, **meta):
    return Sample(id=sample_id, images=["x.jpg"], question=f"q {sample_id}", task=task, meta=meta)


def test_coda_lm_answer_files(tmp_path):
    references = [
        coda_sample("coda/test_0010/general", "general_perception"),
        coda_sample("coda/test_0010/region/1", "region_perception", category="cone"),
        coda_sample("coda/test_0010/suggestion", "driving_suggestion"),
        coda_sample("coda/test_0002/general", "general_perception"),
        coda_sample("coda/test_0002/region/2", "region_perception", category="car"),
        coda_sample("coda/test_0002/region/1", "region_perception", category="dog"),
        coda_sample("coda/test_0002/suggestion", "driving_suggestion"),
    ]
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps({"id": s.id, "answer": f"a {s.id}", "skill_chain": None})
                                   + "\n" for s in references))
    paths = write_coda_lm_answers(predictions, references, tmp_path / "coda")
    assert sorted(p.name for p in paths) == [
        "driving_suggestion_answer.jsonl", "general_perception_answer.jsonl",
        "region_perception_answer.jsonl", "region_perception_answer_w_label.jsonl"]

    def rows(name):
        return [json.loads(line) for line in (tmp_path / "coda" / name).read_text().splitlines()]

    general = rows("general_perception_answer.jsonl")
    assert general[0] == {"question_id": 0, "image": "test/images/0002.jpg",
                          "question": "q coda/test_0002/general", "answer": "a coda/test_0002/general"}
    assert [r["question_id"] for r in general] == [0, 1]
    region = rows("region_perception_answer_w_label.jsonl")
    # Files sorted by name, regions in file order within a file.
    assert [(r["question_id"], r["label_name"], r["answer"]) for r in region] == [
        (0, "car", "a coda/test_0002/region/2"), (1, "dog", "a coda/test_0002/region/1"),
        (2, "cone", "a coda/test_0010/region/1")]
    assert region[0]["image"] == "test/images_w_boxes/0002_object_2.jpg"
    assert "label_name" not in rows("region_perception_answer.jsonl")[0]

    vqa = [coda_sample(f"coda/vqa/region_perception/{i}", "region_perception", question_id=i)
           for i in (3, 1)]
    with pytest.raises(ValueError, match="no answer for 2 references record"):
        write_coda_lm_answers(predictions, vqa, tmp_path / "vqa")
    assert not (tmp_path / "vqa").exists()
    answers = [Prediction(s.id, f"a{i}", None) for i, s in enumerate(vqa)]
    write_coda_lm_answers(answers, vqa, tmp_path / "vqa")
    region = [json.loads(line) for line in
              (tmp_path / "vqa" / "region_perception_answer.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["answer"]) for r in region] == [(1, "a1"), (3, "a0")]
    assert not (tmp_path / "vqa" / "region_perception_answer_w_label.jsonl").exists()


def test_route_groups_answer_as_plain_batching_on_qwen2_5_vl(tiny, samples, tmp_path):
    model, processor = tiny("qwen2_5_vl")
    model = mose.convert(model, mose.MoSEConfig(taxonomy="robot"))
    distinct_experts(model)
    sharpen_routers(model, seed=3, spread=prompt_batch(processor, samples))
    report = run(model, processor, samples, tmp_path / "aware.jsonl")
    run(model, processor, samples, tmp_path / "plain.jsonl", route_aware=False)
    assert report.routes >= 3
    assert (tmp_path / "aware.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()


def test_running_decode_routing_decodes_in_plain_batches(converted, samples, tmp_path):
    model, processor = converted
    model.set_decode_routing("running")  # routes change at every step: no route groups to keep
    try:
        report = run(model, processor, samples, tmp_path / "running.jsonl")
    finally:
        model.set_decode_routing("once")
    assert report.routes is None and report.batches == 3


def decode_positions(model, run_it) -> list:
    """The m-RoPE rows of the position ids each cached decode step was given, (3, B) each."""
    seen = []
    hook = model.register_forward_hook(
        lambda _m, _args, kwargs, _out: seen.append(kwargs["position_ids"][-3:, :, 0].clone())
        if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    try:
        with torch.no_grad():
            run_it()
    finally:
        hook.remove()
    return seen


def test_route_groups_give_each_prompt_generates_m_rope_positions(converted, samples):
    """Qwen2-VL: an image of 4 × 4 tokens advances the position by 4, not 16; a decode batch
    mixing prompts from other prefill batches must keep each prompt's own offset."""
    model, processor = converted
    model = copy.deepcopy(model)
    for block in mose_blocks(model):  # one route for all: decode batches mix text and image prompts
        torch.nn.init.zeros_(block.router.weight)
    # A text-only question among them: its offset is 0, the others' are not.
    samples = [*samples[:4], Sample(id="robot/text", images=[], question="Is the gripper open?"),
               *samples[4:8]]
    answerer = Answerer(model, processor, GenerationOptions(max_new_tokens=4))
    config = answerer.generation_config()
    config.eos_token_id = []  # every answer its full length: the same steps either way
    expected = {}
    for i, sample in enumerate(samples):
        steps = decode_positions(model, lambda s=sample: model.generate(**answerer.inputs([s]),
                                                                        generation_config=config))
        expected[i] = [step[:, 0].tolist() for step in steps]  # the prompt alone
    decoder = RouteGroupDecoder(model, config, batch_size=3)
    batches = [(rows, answerer.inputs([samples[i] for i in rows])) for rows in plain_batches(len(samples), 3)]
    order = []
    steps = decode_positions(model, lambda: decoder.run(iter(batches), lambda *_: None))
    for composition in decoder.compositions:
        order += [composition] * (config.max_new_tokens - 1)  # no answer ends early: one composition each
    got = {}
    for rows, step in zip(order, steps, strict=True):
        for b, index in enumerate(rows):
            got.setdefault(index, []).append(step[:, b].tolist())
    assert got == expected
    with torch.no_grad():  # the prompts' offsets really differ (the text-only one's is 0)
        model.generate(**answerer.inputs(samples), generation_config=config, max_new_tokens=1)
    assert len(set(model.model.rope_deltas.view(-1).tolist())) > 1
