"""What a methods table counts: scores, parameters (trainable, active per token), answer tokens/s,
routing on the test split, and how alike the experts the test split reaches are."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mose.arch import arch_of
from mose.config import resolve_layers
from mose.data import Sample
from mose.data.collate import Collator, SampleEncoder
from mose.data.schema import atomic_path
from mose.eval.analysis import SHARED, LayerSimilarity, expert_similarity
from mose.eval.batching import check_batch_size, is_mose
from mose.eval.predict import GenerationOptions, check_skill_labels, eval_mode, partial_path, predict
from mose.eval.predictions import Prediction, read_predictions
from mose.eval.score import score, write_scores
from mose.eval.score.common import Pair
from mose.eval.score.world import routing_agreement
from mose.layers.blocks import expert_blocks
from mose.models.device import Placement, dtype_str, model_device, model_dtype, to_device


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def trainable_params(model: nn.Module) -> int:
    """What the method's fine-tuning trains: the MoSE / token-MoE blocks, or the even layers' FFNs.

    MoSE's routers are counted once: the router stage and the SFT stage train the same routers.
    """
    blocks = expert_blocks(model)
    if blocks:  # less a LoRA block's frozen base FFN
        return _count(blocks) - _count([b.base for b in blocks if b.base is not None])
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
    engine: str = "torch"  # what generated the answers: torch (mose's own) or vllm

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds else 0.0


def evaluate(model: Any, processor: Any, test: list[Sample], test_path: Path, out_dir: Path,
             max_new_tokens: int, batch_size: int = 16, bench: str = "world",
             judge: dict[str, Any] | None = None, force_skills: bool = False,
             vllm_from: Path | None = None) -> Evaluation:
    """Answer the test split (reusing finished predictions) and score it with `bench`'s scorer.

    The timing of the run that generated the predictions is kept beside them, with the
    generation settings, so a rerun that reuses them reports the same speed, and answers
    generated with other settings are generated again. `force_skills`: routes forced to
    each test record's labelled chain (the oracle). `vllm_from`: the model's saved folder, to
    answer through vLLM (`mose predict --engine vllm`) instead of with `model`.
    """
    predictions, timing = out_dir / "predictions.jsonl", out_dir / "timing.json"
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                **({"force_skills": True} if force_skills else {}), **placement_settings(model),
                **({"engine": "vllm"} if vllm_from is not None else {})}
    times = json.loads(timing.read_text()) if timing.is_file() else {}
    if not predictions.is_file() or times.get("settings") != settings:
        # No timing, or answers generated otherwise: generate them all again, in one timed call
        # (answers resumed from an interrupted call would count tokens this call never timed).
        predictions.unlink(missing_ok=True)
        partial_path(predictions).unlink(missing_ok=True)
        if vllm_from is not None:
            from mose.serving.predict import predict_with_vllm

            placement = model_placement(model)
            model.to("cpu")  # the engine (and the routing pass it runs) need the device's memory
            try:
                report = predict_with_vllm(str(vllm_from), test, predictions, placement=placement,
                                           batch_size=batch_size, options=GenerationOptions(max_new_tokens),
                                           progress=False, source=str(test_path))
            finally:
                model.to(placement.device)
        else:
            report = predict(model, processor, test, predictions, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, force_skills=force_skills, source=str(test_path))
        tokens = answer_tokens(processor, read_predictions(predictions).values())
        times = {"answer_tokens": tokens, "seconds": report.seconds, "settings": settings}
        with atomic_path(timing) as temp:
            temp.write_text(json.dumps(times) + "\n")
    scores = score(bench, predictions, test_path, **(judge or {}))
    write_scores(out_dir / "scores.json", scores)
    return Evaluation(scores, times["answer_tokens"], times["seconds"], settings.get("engine", "torch"))


def engine_serves(model: Any, engine: str, force_skills: bool = False) -> bool:
    """Whether a study with `generation.engine: vllm` answers this model through vLLM: a MoSE model
    an adapter reproduces (LoRA experts, no modality groups, routes kept while decoding), routed by
    its own routers. Every other model answers with mose's own generation."""
    if engine != "vllm" or force_skills:
        return False
    from mose.export import ExportError, check_exportable

    try:
        cfg = check_exportable(model)
    except ExportError:
        return False
    return cfg.decode_routing == "once"


def model_placement(model: Any) -> Placement:
    return Placement(model_device(model), model_dtype(model))


def placement_settings(model: Any) -> dict[str, str]:
    """Where and in what dtype the answers are generated, as timing settings: another device gives
    another speed, another dtype other answers. Empty for the CPU in float32, where every earlier
    study generated, so their predictions stay reused."""
    device, dtype = model_device(model).type, dtype_str(model_dtype(model))
    return {} if (device, dtype) == ("cpu", "float32") else {"device": device, "dtype": dtype}


def answer_tokens(processor: Any, predictions: Any) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    # +1: the end-of-turn token that stops each answer
    return sum(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) + 1 for p in predictions)


def routing_on_test(predictions: Mapping[str, Prediction], test: Sequence[Sample],
                 levels: Sequence[str]) -> dict[str, Any] | None:
    """How often the answers' skill chains pick each test record's labelled skill, per level and
    for the whole chain ({"n", "by_level": {level: %}, "chain": %}), as the world's scorer counts it;
    None without chains or labels."""
    pairs = [Pair(s, predictions[s.id]) for s in test if s.id in predictions]
    return routing_agreement(pairs, list(levels))


def expert_tokens(model: Any, processor: Any, samples: Sequence[Sample], *, batch_size: int = 16,
                  force_skills: bool = False, source: str = "samples") -> dict[int, np.ndarray]:
    """MoE layer → real prompt tokens each of its routed experts received, (E,) int64, summed over
    forwards of the samples' prompts (as answering encodes them, padding never counted).

    `force_skills`: MoSE routes forced to each sample's labelled skills (the oracle's test routes).
    Only the last position's logits are computed: the counts are all that is read.
    """
    check_batch_size(batch_size)
    taxonomy = None
    if force_skills:
        if not is_mose(model):
            raise ValueError("force_skills needs a MoSE model")
        taxonomy = model.mose_config.taxonomy
        check_skill_labels(samples, taxonomy, source)
    encoder = SampleEncoder(processor, taxonomy=taxonomy, source=source)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad, padding_side="right")
    last_only = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters
                 else {})
    totals: dict[int, np.ndarray] = {}
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate([encoder(s, with_answer=False) for s in samples[start:start + batch_size]])
            batch.pop("labels")  # all ignored: a prompt has no answer
            model(**to_device(batch, model_device(model)), use_cache=False, **last_only)
            for layer, counts in model.mose_state.tokens_per_expert.items():
                counts = counts.cpu().numpy().astype(np.int64)  # (E,)
                totals[layer] = totals[layer] + counts if layer in totals else counts
    return totals


def routed_pairs(layer: LayerSimilarity, routed: np.ndarray) -> np.ndarray:
    """Cosine similarities between distinct routed experts that both received tokens.

    `routed`: (R,) bool over the layer's routed experts in order (the shared expert, never
    routed, is left out as in `LayerSimilarity.routed_off_diagonal`).
    """
    keep = [i for i, label in enumerate(layer.labels) if label != SHARED]
    if len(keep) != len(routed):
        raise ValueError(f"layer {layer.layer}: {len(keep)} routed experts but a mask of {len(routed)}")
    used = [i for i, on in zip(keep, routed, strict=True) if on]
    sub = layer.matrix[np.ix_(used, used)]  # (U, U)
    return sub[~np.eye(len(used), dtype=bool)]


@dataclass(frozen=True)
class Diversity:
    similarity: float | None  # mean over layers of the mean cosine between routed experts that got tokens
    never_routed: int  # routed experts (over every MoE layer) that received no test token
    experts: int  # routed experts over every MoE layer


def routed_similarity(similarity: Sequence[LayerSimilarity], tokens: Mapping[int, np.ndarray]) -> Diversity:
    """Expert diversity over the experts the test split reached: an expert no token was sent to
    is still its upcycled copy of the FFN, and would count as similarity, not specialisation."""
    means, never, experts = [], 0, 0
    for layer in similarity:
        routed = np.asarray(tokens[layer.layer]) > 0  # (R,)
        never += int((~routed).sum())
        experts += len(routed)
        pairs = routed_pairs(layer, routed)
        if pairs.size:
            means.append(float(pairs.mean()))
    return Diversity(sum(means) / len(means) if means else None, never, experts)


def diversity(model: Any, processor: Any, test: Sequence[Sample], *, batch_size: int = 16,
              force_skills: bool = False, source: str = "samples") -> Diversity | None:
    """Expert diversity of a MoE model on the test split's prompts (None: dense, no experts)."""
    if not expert_blocks(model):
        return None
    tokens = expert_tokens(model, processor, test, batch_size=batch_size, force_skills=force_skills,
                           source=source)
    return routed_similarity(expert_similarity(model), tokens)
