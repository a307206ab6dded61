"""Skill annotation as the paper does it: rules first, an LLM for what they miss."""

from __future__ import annotations

from mose.data.schema import Sample
from mose.skills.llm import LLMAnnotator, LLMReport
from mose.skills.rules import Coverage, RuleAnnotator


def annotate(samples: list[Sample], rules: RuleAnnotator | None = None,
             llm: LLMAnnotator | None = None,
             progress: bool = False) -> tuple[list[Sample], Coverage | None, LLMReport | None]:
    """Label samples with one skill per level.

    The rules label every sample; the LLM (if given) is asked only about the
    samples no rule decided any level of, or about all of them without rules.
    Returns (labelled samples, rule coverage, LLM report); the last two are None
    for a step that did not run.
    """
    if rules is None and llm is None:
        raise ValueError("annotation needs rules, an LLM, or both")
    labelled, coverage, undecided = list(samples), None, list(range(len(samples)))
    if rules is not None:
        labelled, coverage = rules.annotate(samples)
        undecided = coverage.undecided
    if llm is None or not undecided:
        return labelled, coverage, None
    answered, report = llm.annotate([samples[i] for i in undecided], progress=progress)
    for i, sample in zip(undecided, answered, strict=True):
        labelled[i] = sample
    return labelled, coverage, report
