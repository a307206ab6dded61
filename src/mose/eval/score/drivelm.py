"""DriveLM: exact-match accuracy and the language metrics (BLEU-1..4, ROUGE-L, CIDEr).

The metrics are pycocoevalcap's own scorers (the COCO caption code DriveLM's
evaluation uses), imported here only, so nothing else pays for them. Its
PTBTokenizer needs Java, so text is tokenised here instead: lower case, runs
of letters and digits kept (a decimal number such as 258.3 stays one token),
every other character (punctuation, underscores, brackets) dropped. Values are
as the scorers return them (BLEU and ROUGE-L in 0..1, CIDEr in 0..10), over all
samples and per stage (`task`: perception, prediction, planning, behavior);
CIDEr weighs n-grams by their rarity in the references, so a stage's CIDEr is
computed over that stage alone. Accuracy is in percent.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from rich.table import Table

from mose.eval.score.common import Pair, ScoreError, exact_match, fmt, percent, require_answer

_TOKEN = re.compile(r"[^\W_]+(?:\.\d+)?")
METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")


def tokenize(text: str) -> str:
    """The space-joined tokens pycocoevalcap expects (see the module docstring)."""
    return " ".join(_TOKEN.findall(text.lower()))


def language_metrics(pairs: list[Pair]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr of the predictions against the reference answers."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise ScoreError("DriveLM's language metrics need pycocoevalcap: "
                         "pip install 'mose[drivelm]'") from None

    refs = {i: [tokenize(require_answer(p))] for i, p in enumerate(pairs)}
    hyps = {i: [tokenize(p.prediction.answer)] for i, p in enumerate(pairs)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    rouge, _ = Rouge().compute_score(refs, hyps)
    # CIDEr's document frequencies are empty (and it fails) when no reference has a token.
    cider = Cider().compute_score(refs, hyps)[0] if any(r[0] for r in refs.values()) else 0.0
    values = [*bleu, rouge, cider]
    return {name: round(float(v), 6) for name, v in zip(METRICS, values, strict=True)}


def _section(pairs: list[Pair]) -> dict[str, Any]:
    hits = sum(exact_match(p.prediction.answer, require_answer(p)) for p in pairs)
    return {"accuracy": percent(hits, len(pairs)), "n": len(pairs), **language_metrics(pairs)}


def score(pairs: list[Pair]) -> dict[str, Any]:
    """{"accuracy": %, "n", "bleu_1".."bleu_4", "rouge_l", "cider", "by_stage": {stage: {...}}}."""
    stages: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        stages[pair.sample.task].append(pair)
    return {**_section(pairs), "by_stage": {stage: _section(group) for stage, group in stages.items()}}


def table(scores: dict[str, Any], title: str = "DriveLM") -> Table:
    out = Table("questions", "accuracy %", *METRICS, "n", title=title)

    def row(name: str, cell: dict[str, Any]) -> None:
        out.add_row(name, fmt(cell["accuracy"]), *(fmt(cell[m], 4) for m in METRICS), str(cell["n"]))

    row("[bold]all[/bold]", scores)
    out.add_section()
    for stage, cell in scores["by_stage"].items():
        row(stage, cell)
    return out
