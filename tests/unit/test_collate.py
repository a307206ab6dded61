"""Collation: labels cover the answer only, padding side changes nothing."""

import pytest
import torch

import mose
from mose.data import DataError, Sample, read_jsonl
from mose.data.collate import IGNORE, Collator, EncodedDataset, SampleEncoder, prompt_text
from mose.data.world import generate


@pytest.fixture(scope="module")
def robot_samples(tmp_path_factory):
    return list(read_jsonl(generate("robot", 6, seed=2, out=tmp_path_factory.mktemp("robot"))))


def test_labels_are_the_answer_tokens_and_end_of_turn_only(tiny, robot_samples):
    _, processor = tiny("qwen2_vl")
    encoder = SampleEncoder(processor, mose.load_taxonomy("robot"))
    for sample in robot_samples:
        item = encoder(sample)
        answer = item["input_ids"][item["labels"] != IGNORE]
        # The robot world's records ask for the option's text (its tiny model cannot look letters up).
        assert processor.tokenizer.decode(answer) == sample.choices[sample.correct] + "<|im_end|>"
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert (item["input_ids"] == image_token).sum() == 16  # 112 × 112 → 16 tokens
        assert item["skill_labels"].tolist() == mose.load_taxonomy("robot").encode(sample.skills)
        assert "A. " in prompt_text(sample) and prompt_text(sample).endswith("Answer with the option's text.")


def test_multiple_choice_is_answered_with_the_letter_unless_the_record_asks_for_the_text(tiny):
    _, processor = tiny("qwen2_vl")
    encoder = SampleEncoder(processor)
    asked = Sample(id="q", images=[], question="Is the gripper open?", choices=["Yes", "No"], correct=1,
                   answer="No")
    for meta, target, part in (({}, "B", "letter"), ({"answer_with": "text"}, "No", "text")):
        sample = Sample(**{**asked.to_dict(), "meta": meta})
        item = encoder(sample)
        answer = item["input_ids"][item["labels"] != IGNORE]
        assert processor.tokenizer.decode(answer) == target + "<|im_end|>"
        assert prompt_text(sample).endswith(f"B. No\nAnswer with the option's {part}.")


def test_per_sample_loss_is_the_same_with_either_padding_side(tiny, robot_samples):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.MoSEConfig(taxonomy="robot"))
    items = EncodedDataset(robot_samples[:3], SampleEncoder(processor, model.mose_config.taxonomy)).items

    def per_sample_losses(side):
        batch = Collator(processor.tokenizer.pad_token_id, side)(items)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T-1)
        return losses.sum(1) / (labels != IGNORE).sum(1), batch

    right, batch = per_sample_losses("right")
    left, _ = per_sample_losses("left")
    torch.testing.assert_close(right, left, atol=1e-4, rtol=1e-4)
    assert batch["skill_labels"].shape == (3, 3)
    assert batch["attention_mask"].sum() == sum(len(i["input_ids"]) for i in items)


def test_text_only_model_and_bad_inputs(tiny, tmp_path):
    _, tokenizer = tiny("qwen2")
    encoder = SampleEncoder(tokenizer)
    item = encoder(Sample(id="t", images=[], question="Where is the cone?", answer="left"))
    assert tokenizer.decode(item["input_ids"][item["labels"] != IGNORE]) == "left<|im_end|>"
    with pytest.raises(DataError, match="record t, field 'images'"):
        encoder(Sample(id="t", images=["x.png"], question="q", answer="a"))
    _, processor = tiny("qwen2_vl")
    with pytest.raises(DataError, match="record m, field 'images': cannot open image"):
        SampleEncoder(processor)(Sample(id="m", images=[str(tmp_path / "gone.png")], question="q",
                                        answer="a"))
    with pytest.raises(DataError, match="record u, field 'skills'"):
        SampleEncoder(tokenizer, mose.load_taxonomy("driving"), source="train.jsonl")(
            Sample(id="u", images=[], question="q", answer="a", skills={"perception": "ufo"}))


def test_an_encoding_cache_is_reused_per_file_and_settings_and_labels_follow_the_taxonomy(
        tiny, robot_samples, tmp_path, monkeypatch):
    from dataclasses import replace

    from mose.data import write_jsonl
    from mose.train.data import EncodingCache

    _, processor = tiny("qwen2_vl")
    source = tmp_path / "robot.jsonl"
    write_jsonl(source, robot_samples)
    calls = []
    original = SampleEncoder.encode

    def encode(self, sample, with_answer=True):
        calls.append(sample.id)
        return original(self, sample, with_answer)

    monkeypatch.setattr(SampleEncoder, "encode", encode)
    cache = EncodingCache(keep=2)
    plain, routed = SampleEncoder(processor), SampleEncoder(processor, mose.load_taxonomy("robot"))
    first = EncodedDataset(robot_samples, plain, cache=cache(source, plain, True))
    again = EncodedDataset(robot_samples[:3], routed, cache=cache(source, routed, True))
    assert len(calls) == len(robot_samples)  # the second dataset encoded nothing
    assert "skill_labels" not in first.items[0] and "skill_labels" in again.items[0]  # added per taxonomy
    assert torch.equal(first.items[0]["input_ids"], again.items[0]["input_ids"])
    EncodedDataset(robot_samples, plain, with_answer=False, cache=cache(source, plain, False))
    assert len(calls) == 2 * len(robot_samples)  # prompts alone are another set
    write_jsonl(source, robot_samples[::-1])  # rewritten: another file
    EncodedDataset(robot_samples, plain, cache=cache(source, plain, True))
    assert len(calls) == 3 * len(robot_samples)
    # Records that share an id but not their content are never shared through the cache.
    twins = [robot_samples[0], replace(robot_samples[1], id=robot_samples[0].id)]
    items = EncodedDataset(twins, plain, cache=cache(source, plain, True)).items
    assert not torch.equal(items[0]["pixel_values"], items[1]["pixel_values"])  # their own images
