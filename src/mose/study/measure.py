"""What a methods table counts: scores, parameters (trainable, active per token), answer tokens/s."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mose.arch import arch_of
from mose.config import resolve_layers
from mose.data import Sample
from mose.data.schema import atomic_path
from mose.eval.predict import partial_path, predict
from mose.eval.predictions import read_predictions
from mose.eval.score import score, write_scores
from mose.layers.blocks import expert_blocks


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def trainable_params(model: nn.Module) -> int:
    """What the method's fine-tuning trains: the MoSE / token-MoE blocks, or the even layers' FFNs.

    MoSE's routers are counted once: the router stage and the SFT stage train the same routers.
    """
    blocks = expert_blocks(model)
    if blocks:
        return _count(blocks)
    layers = arch_of(model).layers(model)
    return _count([layers[i].mlp for i in resolve_layers("even", len(layers))])


def active_params(model: nn.Module) -> int:
    """Parameters one token uses: all of the model but the routed experts it is not sent to.

    A MoE layer keeps its router, its shared expert (MoSE) and `top_k` of its
    routed experts; embeddings and the vision tower count in full.
    """
    total = _count([model])
    for block in expert_blocks(model):
        experts = block.experts
        per_expert = _count([experts]) // experts.num_experts
        total -= (experts.num_experts - block.top_k) * per_expert
    return total


@dataclass
class Evaluation:
    scores: dict[str, Any]  # `score("world", ...)`
    answer_tokens: int  # tokens generated up to and including each answer's end token
    seconds: float  # wall time of the test generation (routing included for MoSE)

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds else 0.0


def evaluate(model: Any, processor: Any, test: list[Sample], test_path: Path, out_dir: Path,
             max_new_tokens: int, batch_size: int = 16, bench: str = "world",
             judge: dict[str, Any] | None = None) -> Evaluation:
    """Answer the test split (reusing finished predictions) and score it with `bench`'s scorer.

    The timing of the run that generated the predictions is kept beside them, with the
    generation settings, so a rerun that reuses them reports the same speed, and answers
    generated with other settings are generated again.
    """
    predictions, timing = out_dir / "predictions.jsonl", out_dir / "timing.json"
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    times = json.loads(timing.read_text()) if timing.is_file() else {}
    if not predictions.is_file() or times.get("settings") != settings:
        # No timing, or answers generated otherwise: generate them all again, in one timed call
        # (answers resumed from an interrupted call would count tokens this call never timed).
        predictions.unlink(missing_ok=True)
        partial_path(predictions).unlink(missing_ok=True)
        report = predict(model, processor, test, predictions, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, source=str(test_path))
        tokens = answer_tokens(processor, read_predictions(predictions).values())
        times = {"answer_tokens": tokens, "seconds": report.seconds, "settings": settings}
        with atomic_path(timing) as temp:
            temp.write_text(json.dumps(times) + "\n")
    scores = score(bench, predictions, test_path, **(judge or {}))
    write_scores(out_dir / "scores.json", scores)
    return Evaluation(scores, times["answer_tokens"], times["seconds"])


def answer_tokens(processor: Any, predictions: Any) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    # +1: the end-of-turn token that stops each answer
    return sum(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) + 1 for p in predictions)
