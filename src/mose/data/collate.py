"""From sample records to model batches.

`SampleEncoder` turns one record into token ids once (chat template, image
tokens through the processor, labels masked to the answer tokens); an
`EncodedDataset` keeps those so preprocessing never runs inside a training
step; `Collator` pads a list of encoded samples on either side.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from PIL import Image
from rich.progress import track

from mose.data.schema import DataError, Sample
from mose.skills.taxonomy import Taxonomy

IGNORE = -100  # label of tokens the loss skips
LETTERS = "ABCDEFGHIJ"
END_OF_TURN = "<|im_end|>"


def answers_with_text(sample: Sample) -> bool:
    """Multiple choice answered with the option's text, not its letter: records that say so
    (`meta["answer_with"] == "text"`, the procedural robot world's, whose tiny model cannot learn
    to look a letter up; see docs/calibration.md)."""
    return sample.meta.get("answer_with") == "text"


def prompt_text(sample: Sample) -> str:
    """The question as asked: multiple choice lists lettered options."""
    if not sample.choices:
        return sample.question
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))
    part = "text" if answers_with_text(sample) else "letter"
    return f"{sample.question}\n{options}\nAnswer with the option's {part}."


def target_text(sample: Sample) -> str | None:
    """What the model learns to say: for multiple choice the letter (or the option's text, where
    the record asks for it), else the answer."""
    if sample.choices and sample.correct is not None:
        return sample.choices[sample.correct] if answers_with_text(sample) else LETTERS[sample.correct]
    return sample.answer


def load_images(sample: Sample, source: str) -> list[Image.Image]:
    images = []
    for path in sample.images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (FileNotFoundError, OSError) as error:
            raise DataError(source, sample.id, "images", f"cannot open image {path}: {error}") from None
    return images


class SampleEncoder:
    """One sample → token ids, labels, image tensors and skill labels (unpadded)."""

    def __init__(self, processor: Any, taxonomy: Taxonomy | None = None,
                 max_length: int | None = None, source: str = "samples") -> None:
        """`source` (the JSONL path, say) is what error messages name as the file."""
        self.source = source
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.taxonomy = taxonomy
        self.max_length = max_length
        self.vision = hasattr(processor, "image_processor")

    def settings(self) -> str:
        """What `encode` depends on besides the sample: two encoders with equal settings encode alike."""
        image = getattr(self.processor, "image_processor", None)
        return json.dumps([self.tokenizer.name_or_path, len(self.tokenizer), self.tokenizer.chat_template,
                           self.max_length, None if image is None else image.to_dict()],
                          sort_keys=True, default=str)

    def __call__(self, sample: Sample, with_answer: bool = True) -> dict[str, torch.Tensor]:
        return self.with_skills(self.encode(sample, with_answer), sample)

    def with_skills(self, item: dict[str, torch.Tensor], sample: Sample) -> dict[str, torch.Tensor]:
        """The item with the sample's skill labels, (L,), when there is a taxonomy and labels."""
        if self.taxonomy is None or sample.skills is None:
            return item
        try:
            return {**item, "skill_labels": torch.tensor(self.taxonomy.encode(sample.skills))}  # (L,)
        except ValueError as error:
            raise DataError(self.source, sample.id, "skills", str(error)) from None

    def content(self, sample: Sample, with_answer: bool = True) -> tuple:
        """All of a sample that `encode` reads: samples with equal content encode alike."""
        return tuple(sample.images), prompt_text(sample), target_text(sample) if with_answer else None

    def chat_text(self, sample: Sample) -> str:
        """The prompt as the model reads it: the question in the chat template, one image
        placeholder per image, ending where the answer starts."""
        content: Any
        if self.vision:
            content = [{"type": "image"} for _ in sample.images]
            content.append({"type": "text", "text": prompt_text(sample)})
        elif sample.images:
            raise DataError(self.source, sample.id, "images", "a text-only model cannot take images")
        else:
            content = prompt_text(sample)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def encode(self, sample: Sample, with_answer: bool = True) -> dict[str, torch.Tensor]:
        """Token ids, labels and image tensors (no skill labels)."""
        images = load_images(sample, self.source) if self.vision else []
        prompt = self.encode_prompt(self.chat_text(sample), images)
        prompt_ids = prompt.pop("input_ids")  # (P,)
        item = {k: v for k, v in prompt.items() if k != "mm_token_type_ids"}
        answer_ids = torch.empty(0, dtype=torch.long)
        if with_answer:
            target = target_text(sample)
            if target is None:
                raise DataError(self.source, sample.id, "answer", "training needs an answer")
            # Tokenised apart from the prompt so the boundary is exact.
            answer_ids = self.tokenizer(target + END_OF_TURN, add_special_tokens=False,
                                        return_tensors="pt")["input_ids"][0]  # (A,)
        if self.max_length and len(prompt_ids) + len(answer_ids) > self.max_length:
            if len(prompt_ids) >= self.max_length:
                raise DataError(self.source, sample.id, "question", f"the prompt alone is "
                                f"{len(prompt_ids)} tokens; max_length is {self.max_length}")
            answer_ids = answer_ids[: self.max_length - len(prompt_ids)]
        item["input_ids"] = torch.cat([prompt_ids, answer_ids])  # (P + A,)
        item["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE), answer_ids])
        if "mm_token_type_ids" in prompt:
            item["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(answer_ids)])
        return item

    def encode_prompt(self, text: str, images: Sequence[Image.Image] = ()) -> dict[str, torch.Tensor]:
        """A chat-formatted prompt (`chat_text`'s form) and its images → input_ids (P,), and for a
        VL model pixel_values, image_grid_thw and mm_token_type_ids (P,)."""
        if self.vision:
            encoded = self.processor(text=[text], images=list(images) or None, return_tensors="pt")
        else:
            encoded = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        item = {k: v for k, v in encoded.items() if k in ("pixel_values", "image_grid_thw")}
        item["input_ids"] = encoded["input_ids"][0]  # (P,)
        if "mm_token_type_ids" in encoded:
            item["mm_token_type_ids"] = encoded["mm_token_type_ids"][0]  # (P,)
        return item


class EncodedDataset(torch.utils.data.Dataset):
    """Samples encoded once up front (with a progress bar), reused every epoch.

    `cache` (the encoder's `content()` of a sample → its item without skill labels, for
    this encoder's `settings()` and `with_answer`) lends items encoded before and keeps the
    new ones, so runs over one file encode it once.
    """

    def __init__(self, samples: Sequence[Sample], encoder: SampleEncoder, with_answer: bool = True,
                 progress: bool = False, cache: MutableMapping[tuple, dict] | None = None) -> None:
        self.samples = list(samples)
        if cache is None:
            self.items = [encoder(s, with_answer) for s in
                          track(self.samples, description="tokenising", disable=not progress)]
            return
        keys = [encoder.content(s, with_answer) for s in self.samples]
        missing = {k: s for k, s in zip(keys, self.samples, strict=True) if k not in cache}
        for key, sample in track(missing.items(), description="tokenising",
                                 disable=not progress or not missing):
            cache[key] = encoder.encode(sample, with_answer)
        self.items = [encoder.with_skills(cache[k], s) for k, s in zip(keys, self.samples, strict=True)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class Collator:
    """Pads encoded samples into a batch, on the right (training) or left (generation)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def _pad(self, rows: list[torch.Tensor], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=rows[0].dtype)  # (B, T)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row):] = row
        return out

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": self._pad([i["input_ids"] for i in items], self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(i["input_ids"]) for i in items], 0),
            "labels": self._pad([i["labels"] for i in items], IGNORE),
        }
        if "mm_token_type_ids" in items[0]:
            batch["mm_token_type_ids"] = self._pad([i["mm_token_type_ids"] for i in items], 0)
        if any("pixel_values" in i for i in items):
            with_images = [i for i in items if "pixel_values" in i]
            batch["pixel_values"] = torch.cat([i["pixel_values"] for i in with_images])  # (patches, D)
            batch["image_grid_thw"] = torch.cat([i["image_grid_thw"] for i in with_images])
        if all("skill_labels" in i for i in items):
            batch["skill_labels"] = torch.stack([i["skill_labels"] for i in items])  # (B, L)
        return batch
