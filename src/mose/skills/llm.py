"""LLM skill annotation, for what rules fall short on.

The prompt gives the skill list (with descriptions), the rule list (the
criteria human annotators refined), and the sample: question, answer, choices,
and the image when the endpoint takes images. The reply must be a JSON object
{level: skill} naming a known skill for every level; anything else is
unparsable, reported, and leaves the sample unlabelled. Replies are cached on
disk, one JSON line per sample as soon as it arrives, so an interrupted run
resumes without asking again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from rich.progress import track

from mose.data.schema import Sample
from mose.endpoint import ChatEndpoint
from mose.skills.taxonomy import GENERAL, Taxonomy

RULE_LIST = (
    "Give `general` to a level the question does not use, or when the sample is ambiguous or "
    "incomplete.",
    "Choose the skill the answer needs, not every skill the scene shows.",
    "Use only the skill names listed, spelled exactly.",
)


class UnparsableAnswer(ValueError):
    pass


def parse_skills(text: str, taxonomy: Taxonomy) -> dict[str, str]:
    """Strictly parse a reply into {level: skill}: one JSON object, every level, known skills."""
    match = re.search(r"\{.*\}", text, flags=re.S)
    if not match:
        raise UnparsableAnswer("no JSON object in the reply")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as error:
        raise UnparsableAnswer(f"invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UnparsableAnswer("the JSON is not an object")
    levels = taxonomy.level_names
    if set(data) != set(levels):
        raise UnparsableAnswer(f"levels {sorted(data)} are not exactly {list(levels)}")
    for level in levels:
        if data[level] not in taxonomy.level(level).skills:
            raise UnparsableAnswer(f"unknown skill {data[level]!r} at level {level!r}")
    return {level: data[level] for level in levels}


@dataclass
class LLMReport:
    asked: int = 0
    cached: int = 0
    unparsable: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reason, reply)


class LLMAnnotator:
    def __init__(self, taxonomy: Taxonomy, endpoint: ChatEndpoint, cache: str | Path,
                 rules: Iterable[str] = (), send_images: bool = True) -> None:
        self.taxonomy = taxonomy
        self.endpoint = endpoint
        self.cache_path = Path(cache)
        self.rules = [*RULE_LIST, *rules]
        self.send_images = send_images

    def messages(self, sample: Sample) -> list[dict[str, Any]]:
        skills = "\n".join(
            f"- {level.name}: " + "; ".join(
                f"{s} ({d})" if d else s for s, d in zip(level.skills, level.descriptions, strict=True))
            for level in self.taxonomy.levels)
        rules = "\n".join(f"{i}. {rule}" for i, rule in enumerate(self.rules, start=1))
        example = json.dumps({level: GENERAL for level in self.taxonomy.level_names})
        system = (f"You label embodied-AI questions with the skill each reasoning level needs.\n"
                  f"Levels, in order, and their skills:\n{skills}\n\nRules:\n{rules}\n\n"
                  f"Reply with one JSON object and nothing else, e.g. {example}")
        lines = [f"Question: {sample.question}"]
        if sample.choices:
            lines.append("Choices: " + " | ".join(sample.choices))
        if sample.answer is not None:
            lines.append(f"Answer: {sample.answer}")
        lines.append(f"Task: {sample.task}")
        content: list[dict[str, Any]] = [{"type": "text", "text": "\n".join(lines)}]
        if self.send_images:
            content += [{"type": "image_url", "image_url": {"url": _data_url(p)}} for p in sample.images]
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def annotate(self, samples: list[Sample], progress: bool = False) -> tuple[list[Sample], LLMReport]:
        cache = self._load_cache()
        report = LLMReport()
        out = []
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a", encoding="utf-8") as log:
            for sample in track(samples, description="asking the LLM", disable=not progress):
                messages = self.messages(sample)
                key = _key(self.endpoint.model, messages)
                if key in cache:
                    reply = cache[key]
                    report.cached += 1
                else:
                    reply = self.endpoint.ask(messages)
                    report.asked += 1
                    log.write(json.dumps({"id": sample.id, "key": key, "reply": reply}) + "\n")
                    log.flush()  # each answer is kept the moment it arrives
                try:
                    out.append(replace(sample, skills=parse_skills(reply, self.taxonomy)))
                except UnparsableAnswer as error:
                    report.unparsable.append((sample.id, str(error), reply[:200]))
                    out.append(replace(sample, skills=None))
        return out, report

    def _load_cache(self) -> dict[str, str]:
        cache = {}
        if self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by an interruption: that sample is asked again
                cache[entry["key"]] = entry["reply"]
        return cache


def _key(model: str, messages: list[dict[str, Any]]) -> str:
    """Same model and same prompt (images included) → same cached reply."""
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()


def _data_url(path: str) -> str:
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
