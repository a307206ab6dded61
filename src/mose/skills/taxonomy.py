"""Hierarchical skill taxonomies: ordered levels, each with its skills.

A taxonomy comes from a built-in name (`driving`, `robot`, `driving-question`) or a user
YAML file:

    name: my_task
    levels:
      - name: perception
        skills: {general: "...", vehicle: "..."}   # or a list of names
                                                   # (then descriptions: {name: text})

Every level must have a `general` skill: it catches ambiguous samples and the
levels a sample does not use, so a missing level in a label means `general`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

GENERAL = "general"
BUILTIN = ("driving", "robot", "driving-question")


@dataclass(frozen=True)
class Level:
    name: str
    skills: tuple[str, ...]
    descriptions: tuple[str, ...]

    def index(self, skill: str) -> int:
        try:
            return self.skills.index(skill)
        except ValueError:
            raise ValueError(
                f"unknown skill {skill!r} at level {self.name!r}; "
                f"known: {', '.join(self.skills)}"
            ) from None


@dataclass(frozen=True)
class Taxonomy:
    name: str
    levels: tuple[Level, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError(f"taxonomy {self.name!r} has no levels")
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"taxonomy {self.name!r} repeats a level: {names}")
        for level in self.levels:
            if GENERAL not in level.skills:
                raise ValueError(
                    f"taxonomy {self.name!r}, level {level.name!r} lacks the "
                    f"{GENERAL!r} skill (every level needs one)"
                )
            if len(set(level.skills)) != len(level.skills):
                raise ValueError(f"taxonomy {self.name!r}, level {level.name!r} repeats a skill")

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def level(self, name: str) -> Level:
        for level in self.levels:
            if level.name == name:
                return level
        raise ValueError(
            f"unknown level {name!r} in taxonomy {self.name!r}; "
            f"levels: {', '.join(self.level_names)}"
        )

    def encode(self, label: Mapping[str, str] | None) -> list[int]:
        """One skill label ({level: skill}, missing levels = general) → skill indices."""
        label = dict(label or {})
        unknown = set(label) - set(self.level_names)
        if unknown:
            raise ValueError(
                f"skill label names unknown level(s) {sorted(unknown)} for taxonomy "
                f"{self.name!r}; levels: {', '.join(self.level_names)}"
            )
        return [level.index(label.get(level.name) or GENERAL) for level in self.levels]

    def encode_batch(self, labels: Sequence[Mapping[str, str] | None]) -> torch.Tensor:
        """A batch of skill labels → a (B, L) long tensor of skill indices."""
        return torch.tensor([self.encode(label) for label in labels], dtype=torch.long)

    def decode(self, indices: Sequence[int]) -> dict[str, str]:
        return {level.name: level.skills[i] for level, i in zip(self.levels, indices, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        # Skills as a list: their order is their index, and JSON writers (transformers'
        # config.json among them) may sort the keys of a mapping.
        return {
            "name": self.name,
            "levels": [
                {"name": level.name, "skills": list(level.skills),
                 "descriptions": dict(zip(level.skills, level.descriptions, strict=True))}
                for level in self.levels
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Taxonomy:
        try:
            levels = tuple(_level_from_dict(level) for level in data["levels"])
            return cls(name=str(data.get("name", source)), levels=levels)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{source}: not a taxonomy (expected `levels: [{{name, skills}}, ...]`): {error!r}"
            ) from None

    @classmethod
    def load(cls, name_or_path: str | Path) -> Taxonomy:
        """A built-in taxonomy by name, or a YAML file by path."""
        if str(name_or_path) in BUILTIN:
            text = resources.files("mose.skills").joinpath(
                f"taxonomies/{name_or_path}.yaml"
            ).read_text()
            return cls.from_dict(yaml.safe_load(text), source=str(name_or_path))
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"unknown taxonomy {str(name_or_path)!r}: neither a built-in "
                f"({', '.join(BUILTIN)}) nor a YAML file"
            )
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from None
        return cls.from_dict(data, source=str(path))


def _level_from_dict(data: Mapping[str, Any]) -> Level:
    skills = data["skills"]
    names = [str(name) for name in skills]
    described = skills if isinstance(skills, Mapping) else data.get("descriptions") or {}
    descriptions = [str(described.get(name) or "") for name in names]
    return Level(str(data["name"]), tuple(names), tuple(descriptions))


def load_taxonomy(taxonomy: str | Path | Taxonomy | Mapping[str, Any]) -> Taxonomy:
    """Whatever a user passes as a taxonomy → a Taxonomy."""
    if isinstance(taxonomy, Taxonomy):
        return taxonomy
    if isinstance(taxonomy, Mapping):
        return Taxonomy.from_dict(taxonomy)
    return Taxonomy.load(taxonomy)
