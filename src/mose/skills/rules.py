"""Declarative rule annotation: YAML rules over a sample's fields and text.

    taxonomy: driving
    rules:
      - name: suggestion says stop          # shown in the coverage report
        level: planning
        skill: stop                         # a fixed skill ...
        when:                               # ... if every condition holds
          task: driving_suggestion          # equality
          answer: {any: [stop, halt]}       # whole words or phrases, any case
      - name: region category
        level: perception
        field: meta.category_name           # ... or the skill a field's value maps to
        map: {car: vehicle, pedestrian: vru}

Conditions: a plain value (equality), `{any: [...]}`, `{all: [...]}`,
`{regex: "..."}` (case-insensitive search) or `{in: [...]}`. Fields: id, task,
question, answer, choices (one per line), images, and meta.a.b for metadata.
The first rule that fires decides a level; a level no rule decides is `general`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mose.data.schema import Sample
from mose.skills.taxonomy import GENERAL, Taxonomy, load_taxonomy

BUILTIN_RULES = ("coda-lm", "robo2vlm", "drivelm", "world-driving", "world-robot", "world-driving-question")


def field_value(sample: Sample, path: str) -> Any:
    """A sample's value at a field path; None where it is absent."""
    head, *rest = path.split(".")
    if head == "choices":
        value: Any = "\n".join(sample.choices or [])
    elif head in ("id", "task", "question", "answer", "images", "meta", "correct"):
        value = getattr(sample, head)
    else:
        raise ValueError(f"unknown field {path!r}")
    for key in rest:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _words(terms: list[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(str(t)) for t in terms)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Condition:
    path: str
    test: Any  # a callable on the field's value
    text: str = ""  # how the rule file said it, for prompts and reports

    def holds(self, sample: Sample) -> bool:
        return self.test(field_value(sample, self.path))


def _condition(path: str, spec: Any, where: str) -> Condition:
    if not isinstance(spec, Mapping):
        return Condition(path, lambda v, spec=spec: v == spec, f"{path} is {spec!r}")
    if len(spec) != 1:
        raise ValueError(f"{where}: condition on {path!r} needs exactly one of any/all/regex/in")
    (kind, arg), = spec.items()
    if kind in ("any", "all"):
        patterns = [_words([t]) for t in arg]
        combine = any if kind == "any" else all
        return Condition(path, lambda v: v is not None and combine(p.search(str(v)) for p in patterns),
                         f"{path} contains {kind} of {list(arg)}")
    if kind == "regex":
        pattern = re.compile(arg, re.IGNORECASE)
        return Condition(path, lambda v: v is not None and bool(pattern.search(str(v))),
                         f"{path} matches /{arg}/")
    if kind == "in":
        return Condition(path, lambda v, allowed=tuple(arg): v in allowed, f"{path} is one of {list(arg)}")
    raise ValueError(f"{where}: unknown condition {kind!r} (use any, all, regex or in)")


@dataclass(frozen=True)
class Rule:
    name: str
    level: str
    conditions: tuple[Condition, ...]
    skill: str | None = None
    map_field: str | None = None  # with `mapping`: the skill is mapping[value of this field]
    mapping: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The rule in words, as the LLM annotator's prompt lists it."""
        then = (f"{self.level} = {self.skill}" if self.skill is not None
                else f"{self.level} from {self.map_field}: {dict(self.mapping)}")
        when = " and ".join(c.text for c in self.conditions)
        return f"{then}" + (f" when {when}" if when else "")

    def apply(self, sample: Sample) -> str | None:
        """The skill this rule gives the sample, or None if it does not fire."""
        if not all(c.holds(sample) for c in self.conditions):
            return None
        if self.skill is not None:
            return self.skill
        value = field_value(sample, self.map_field)
        return None if value is None else self.mapping.get(str(value).lower())


@dataclass
class Coverage:
    """How many samples each rule labelled, and how many fell to `general` per level."""

    total: int = 0
    by_rule: Counter = field(default_factory=Counter)
    general: Counter = field(default_factory=Counter)
    undecided: list[int] = field(default_factory=list)  # samples no rule decided any level of


class RuleAnnotator:
    def __init__(self, taxonomy: Taxonomy, rules: list[Rule]) -> None:
        self.taxonomy = taxonomy
        self.rules = rules

    @classmethod
    def load(cls, name_or_path: str | Path, taxonomy: str | Taxonomy | None = None) -> RuleAnnotator:
        """A shipped rule set by name (coda-lm, robo2vlm, drivelm, world-driving,
        world-robot, world-driving-question) or a YAML file; `taxonomy` overrides the file's own."""
        if str(name_or_path) in BUILTIN_RULES:
            source = f"rules:{name_or_path}"
            text = resources.files("mose.skills").joinpath(f"rules/{name_or_path}.yaml").read_text()
        else:
            path = Path(name_or_path)
            if not path.is_file():
                raise ValueError(f"unknown rule set {str(name_or_path)!r}: neither shipped "
                                 f"({', '.join(BUILTIN_RULES)}) nor a file")
            source, text = str(path), path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{source}: invalid YAML: {error}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list):
            raise ValueError(f"{source}: expected `taxonomy: ...` and `rules: [...]`")
        resolved = load_taxonomy(taxonomy or data.get("taxonomy") or "driving")
        return cls(resolved, [_rule(r, i, source, resolved) for i, r in enumerate(data["rules"])])

    def label(self, sample: Sample) -> tuple[dict[str, str], dict[str, str]]:
        """(skill per level, name of the rule that decided each decided level)."""
        skills, decided_by = {}, {}
        for rule in self.rules:
            if rule.level in skills:
                continue
            skill = rule.apply(sample)
            if skill is not None:
                skills[rule.level], decided_by[rule.level] = skill, rule.name
        full = {level: skills.get(level, GENERAL) for level in self.taxonomy.level_names}
        return full, decided_by

    def annotate(self, samples: Iterable[Sample]) -> tuple[list[Sample], Coverage]:
        coverage, out = Coverage(), []
        for sample in samples:
            skills, decided_by = self.label(sample)
            coverage.total += 1
            coverage.by_rule.update(decided_by.values())
            coverage.general.update(level for level, s in skills.items() if s == GENERAL)
            if not decided_by:
                coverage.undecided.append(coverage.total - 1)
            out.append(replace(sample, skills=skills))
        return out, coverage


def _rule(data: Any, index: int, source: str, taxonomy: Taxonomy) -> Rule:
    where = f"{source}, rule {index}"
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    name = str(data.get("name", f"rule {index}"))
    where = f"{source}, rule {index} ({name!r})"
    try:
        level = taxonomy.level(data["level"])
    except KeyError:
        raise ValueError(f"{where}: needs a `level`") from None
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if ("skill" in data) == ("map" in data):
        raise ValueError(f"{where}: give either `skill` or `field` + `map`")
    conditions = tuple(_condition(p, spec, where) for p, spec in (data.get("when") or {}).items())
    try:
        if "skill" in data:
            level.index(data["skill"])
            return Rule(name, level.name, conditions, skill=data["skill"])
        if "field" not in data:
            raise ValueError("`map` needs a `field`")
        mapping = {str(k).lower(): str(v) for k, v in data["map"].items()}
        for skill in mapping.values():
            level.index(skill)
        return Rule(name, level.name, conditions, map_field=data["field"], mapping=mapping)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
