"""Robo2VLM (and any multiple choice): accuracy of the chosen option, by question group.

The answer's option is read by the strict parser of `choice.py`; an unparsable
answer is wrong and counted in `unparsed`. Robo2VLM has no category column, so
the question is matched against its templates (`benchmarks.md`), each in one of
the three groups the benchmark names. The grouping is mose's reading of the
templates; a question no template matches is `other` (e.g. the procedural
robot world's own kinds).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from rich.table import Table

from mose.eval.score.choice import parse_choice
from mose.eval.score.common import Pair, ScoreError, fmt, percent

# (template, group, pattern): the first pattern that matches the question decides.
TEMPLATES = (
    ("gripper_state", "spatial", r"\bgripper\b.*\b(open|closed)\b|state of the (robot'?s? )?gripper"),
    ("reachability", "spatial", r"obstacle.*\bblocking\b|blocking the robot"),
    ("relative_position", "spatial",
     r"relative to the robot'?s end[- ]effector|\b(closest|farthest|furthest)\b.*\bend[- ]effector\b"),
    ("depth", "spatial", r"\b(closest|farthest|furthest)\b.*\bcamera\b"),
    ("multi_view", "spatial", r"red dot.*\bmarked\b|\bmarked\b.*\bright image\b"),
    ("task_success", "goal-conditioned", r"successfully (completed|complete|finished)"),
    ("goal_configuration", "goal-conditioned", r"\bgoal state\b|\bgoal configuration\b"),
    ("next_phase", "goal-conditioned", r"\bnext action phase\b"),
    ("trajectory_description", "goal-conditioned",
     r"language instruction.*\bdescribes?\b|best describes the robot'?s trajectory"),
    ("grasp_stability", "interaction", r"\bgrasp\b.*\bstable\b|\bstable grasp\b"),
    ("grasp_phase", "interaction", r"\bphase of the grasp\b"),
    ("phase_sequence", "interaction", r"\bsequence of (the )?action phases\b"),
    ("motion_direction", "interaction", r"arrow.*\bdirection\b|direction the robot will move next"),
)
GROUPS = ("spatial", "goal-conditioned", "interaction", "other")
_COMPILED = tuple((name, group, re.compile(pattern, re.I)) for name, group, pattern in TEMPLATES)


def template_of(question: str) -> tuple[str, str]:
    """(template, group) of a question; ("other", "other") when no template matches."""
    for name, group, pattern in _COMPILED:
        if pattern.search(question):
            return name, group
    return "other", "other"


def judge(pair: Pair) -> tuple[bool, bool]:
    """(correct, parsed) for one multiple-choice sample."""
    sample = pair.sample
    if not sample.choices or sample.correct is None:
        raise ScoreError(f"reference {sample.id!r}, field 'choices'/'correct': not a multiple-choice "
                         "record; robo2vlm scoring needs choices and a correct index")
    chosen = parse_choice(pair.prediction.answer, sample.choices)
    return chosen == sample.correct, chosen is not None


def score(pairs: list[Pair]) -> dict[str, Any]:
    """{"accuracy": %, "n", "unparsed", "by_group": {group: {accuracy, n}}, "by_template": {...}}."""
    hits = unparsed = 0
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # group → [hits, n]
    templates: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pair in pairs:
        correct, parsed = judge(pair)
        hits += correct
        unparsed += not parsed
        name, group = template_of(pair.sample.question)
        for counts in (groups[group], templates[name]):
            counts[0] += correct
            counts[1] += 1
    return {
        "accuracy": percent(hits, len(pairs)), "n": len(pairs), "unparsed": unparsed,
        "by_group": {g: _cell(*groups[g]) for g in GROUPS if g in groups},
        "by_template": {t: _cell(*templates[t]) for t in sorted(templates)},
    }


def _cell(hits: int, n: int) -> dict[str, Any]:
    return {"accuracy": percent(hits, n), "n": n}


def table(scores: dict[str, Any], title: str = "Robo2VLM") -> Table:
    out = Table("questions", "accuracy %", "n", title=title)
    out.add_row("[bold]all[/bold]", f"[bold]{fmt(scores['accuracy'])}[/bold]", str(scores["n"]))
    out.add_row("  unparsed answers (wrong)", "", str(scores["unparsed"]))
    out.add_section()
    for group, cell in scores["by_group"].items():
        out.add_row(group, fmt(cell["accuracy"]), str(cell["n"]))
    out.add_section()
    for name, cell in scores["by_template"].items():
        out.add_row(f"  {name}", fmt(cell["accuracy"]), str(cell["n"]))
    return out
