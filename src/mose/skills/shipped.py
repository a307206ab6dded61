"""Which shipped rule set fits a data set: recognised from its records' ids and metadata.

Every loader and the procedural world mark their records (`coda/...` ids and
`meta.source: coda-lm`, `world/driving/...` ids and `meta.domain: driving`,
...), so `mose annotate` can pick the rules itself when none are given.
"""

from __future__ import annotations

from collections.abc import Iterable

from mose.data.schema import Sample

# id prefix → shipped rule set
ID_PREFIXES = {"world/driving/": "world-driving", "world/robot/": "world-robot", "coda/": "coda-lm",
               "robo2vlm/": "robo2vlm", "drivelm/": "drivelm"}
META_SOURCES = {"coda-lm": "coda-lm", "robo2vlm": "robo2vlm", "drivelm": "drivelm"}  # meta.source
WORLD_DOMAINS = {"driving": "world-driving", "robot": "world-robot"}  # meta.domain of world records
# taxonomy → (source's rule set → the rule set for that taxonomy), where it is not the source's own
FOR_TAXONOMY = {"driving-question": {"world-driving": "world-driving-question",
                                     "coda-lm": "world-driving-question"}}


def source_of(sample: Sample) -> str | None:
    """The shipped rule set for one record, or None if its source is unknown."""
    meta = sample.meta or {}
    if meta.get("source") in META_SOURCES:
        return META_SOURCES[meta["source"]]
    for prefix, rules in ID_PREFIXES.items():
        if sample.id.startswith(prefix):
            return rules
    if sample.id.startswith("world/") and meta.get("domain") in WORLD_DOMAINS:
        return WORLD_DOMAINS[meta["domain"]]
    return None


def shipped_rules_for(samples: Iterable[Sample], taxonomy: str | None = None) -> str | None:
    """The one shipped rule set every record matches (for `taxonomy`, a built-in name, when it has
    its own rules for that source); None if any is unknown or they disagree."""
    found = {source_of(s) for s in samples}
    if len(found) != 1 or None in found:
        return None
    rules = found.pop()
    return FOR_TAXONOMY.get(taxonomy, {}).get(rules, rules)


def explain_sources(samples: Iterable[Sample]) -> str:
    """Why no rule set was chosen: the sources found, with a count each."""
    counts: dict[str, int] = {}
    for sample in samples:
        key = source_of(sample) or "unknown"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))
