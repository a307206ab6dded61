"""The procedural world (`mose.data.world`): accuracy per level and per skill, and routing.

A sample is right when
- it has choices (robot domain): the strict letter parser (`choice.py`) reads the
  option the reference's `correct` names (the answer text of exactly one choice counts too);
- otherwise (driving domain): the answer equals the reference after normalisation
  (case, whitespace, trailing punctuation).

The level a question belongs to is the deepest level of its skill label whose
skill is not `general`: the world labels every level a question needs, so a
planning question carries perception, prediction and planning skills and belongs
to planning, and a region question (task `region_perception`) belongs to
perception. Without a label (or an all-`general` one) the sample's `task` is its
level. `by_skill[level][skill]` groups the questions of that level by their
skill at it.

Routing: where a prediction has a skill chain and its sample a skill label,
`routing.by_level[level]` is how often the chain's skill at that level is the
labelled one (a level missing from the label is `general`), and `routing.chain`
how often every level agrees.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.table import Table

from mose.eval.score.choice import parse_choice
from mose.eval.score.common import Pair, exact_match, fmt, percent, require_answer

GENERAL = "general"


def level_of(pair: Pair) -> str:
    """The level a question belongs to (see the module docstring)."""
    skills = pair.sample.skills or {}
    used = [level for level, skill in skills.items() if skill != GENERAL]
    return used[-1] if used else pair.sample.task


def judge(pair: Pair) -> tuple[bool, bool | None]:
    """(correct, parsed); parsed is None for open answers (exact match)."""
    sample = pair.sample
    if sample.choices and sample.correct is not None:
        chosen = parse_choice(pair.prediction.answer, sample.choices)
        return chosen == sample.correct, chosen is not None
    return exact_match(pair.prediction.answer, require_answer(pair)), None


def score(pairs: list[Pair]) -> dict[str, Any]:
    """{"overall": %, "n", "by_level", "by_skill", "multiple_choice", "routing"}."""
    levels = _level_order(pairs)
    by_level: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_skill: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    choice = [0, 0, 0]  # hits, n, unparsed
    hits = 0
    for pair in pairs:
        correct, parsed = judge(pair)
        hits += correct
        level = level_of(pair)
        skill = (pair.sample.skills or {}).get(level, GENERAL)
        for counts in (by_level[level], by_skill[level][skill]):
            counts[0] += correct
            counts[1] += 1
        if parsed is not None:
            choice[0] += correct
            choice[1] += 1
            choice[2] += not parsed
    order = [lv for lv in levels if lv in by_level] + sorted(set(by_level) - set(levels))
    result: dict[str, Any] = {
        "overall": percent(hits, len(pairs)), "n": len(pairs),
        "by_level": {lv: _cell(*by_level[lv]) for lv in order},
        "by_skill": {lv: {s: _cell(*by_skill[lv][s]) for s in sorted(by_skill[lv])} for lv in order},
    }
    if choice[1]:
        result["multiple_choice"] = {"accuracy": percent(choice[0], choice[1]), "n": choice[1],
                                     "unparsed": choice[2]}
    routing = routing_agreement(pairs, levels)
    if routing is not None:
        result["routing"] = routing
    return result


def routing_agreement(pairs: list[Pair], levels: list[str]) -> dict[str, Any] | None:
    """Agreement of predicted skill chains with the labels; None if no sample has both."""
    both = [(p.prediction.skills(), p.sample.skills) for p in pairs
            if p.prediction.skill_chain is not None and p.sample.skills is not None]
    if not both:
        return None
    chain_levels = list(dict.fromkeys(lv for chain, _ in both for lv in chain))
    order = [lv for lv in levels if lv in chain_levels] + [lv for lv in chain_levels if lv not in levels]
    agree = {lv: sum(chain.get(lv) == label.get(lv, GENERAL) for chain, label in both) for lv in order}
    whole = sum(all(chain.get(lv) == label.get(lv, GENERAL) for lv in {*chain, *label})
                for chain, label in both)
    return {"n": len(both), "by_level": {lv: percent(agree[lv], len(both)) for lv in order},
            "chain": percent(whole, len(both))}


def _level_order(pairs: list[Pair]) -> list[str]:
    """Levels in the order the labels list them (the world writes them in taxonomy order)."""
    return list(dict.fromkeys(level for p in pairs for level in (p.sample.skills or {})))


def _cell(hits: int, n: int) -> dict[str, Any]:
    return {"accuracy": percent(hits, n), "n": n}


def table(scores: dict[str, Any], title: str = "procedural world") -> Table:
    out = Table("questions", "accuracy %", "n", title=title)
    out.add_row("[bold]all[/bold]", f"[bold]{fmt(scores['overall'])}[/bold]", str(scores["n"]))
    for level, cell in scores["by_level"].items():
        out.add_section()
        out.add_row(level, fmt(cell["accuracy"]), str(cell["n"]))
        for skill, skill_cell in scores["by_skill"][level].items():
            out.add_row(f"  {skill}", fmt(skill_cell["accuracy"]), str(skill_cell["n"]))
    choice = scores.get("multiple_choice")
    if choice:
        out.add_section()
        out.add_row("multiple choice", fmt(choice["accuracy"]), str(choice["n"]))
        out.add_row("  unparsed answers (wrong)", "", str(choice["unparsed"]))
    routing = scores.get("routing")
    if routing:
        out.add_section()
        out.add_row("routing: chain = label", fmt(routing["chain"]), str(routing["n"]))
        for level, agreement in routing["by_level"].items():
            out.add_row(f"  {level} skill = label", fmt(agreement), str(routing["n"]))
    return out
