"""One question, one answer, and the skill chain that explains it (`mose chat`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mose.data.schema import Sample
from mose.eval.batching import is_mose
from mose.eval.predict import Answerer, GenerationOptions
from mose.routing import SkillChain

NO_CHAIN = "no skill chain (not a MoSE model)"


def answer_one(model: Any, processor: Any, image: str | Path | None, question: str, *,
               max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, seed: int = 0) -> tuple[str, SkillChain | None]:
    """Answer one question (about one image, or none) in one forward pass.

    The prompt is built as training builds it; the skill chain is None for a
    dense or token-MoE model. A missing image is a DataError naming it.
    """
    options = GenerationOptions(max_new_tokens, do_sample, temperature, top_p, seed)
    sample = Sample(id="chat", images=[str(image)] if image is not None else [], question=question)
    answerer = Answerer(model, processor, options, source="mose chat")
    if do_sample:
        torch.manual_seed(seed)
    prediction = answerer.answer([sample])[0]
    chain = model.skill_chains()[0] if is_mose(model) else None
    return prediction.answer, chain


def format_chain(chain: SkillChain | Mapping[str, Mapping[str, Any]] | None) -> str:
    """`perception: vru (0.93) → prediction: crossing (0.88) → planning: yield (0.95)`.

    Takes a SkillChain or its JSON form from a predictions file ({level: {skill, prob}}).
    """
    if chain is None:
        return NO_CHAIN
    if isinstance(chain, SkillChain):
        return str(chain)
    return " → ".join(f"{level}: {c['skill']} ({float(c['prob']):.2f})" for level, c in chain.items())
