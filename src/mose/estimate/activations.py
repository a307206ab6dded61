"""Activation memory of one training micro-batch, derived from the model's shape.

The count follows what autograd saves for backward in a Qwen2 decoder, op by op
(checked against the bytes `torch.autograd.graph.saved_tensors_hooks` sees at the
real widths: `bench/real_shape.py`'s `activations` check). With B samples of T
tokens (images included), hidden H, FFN width I, `a` bytes per activation (2 in
bf16) and everything frozen below the first trained module:

- nothing below the first trained module is saved (no input needs a gradient);
- a decoder layer whose input needs a gradient saves, for attention: its two
  RMSNorm inputs in fp32 (2 × 4·BTH) and SDPA's q, k, v (k and v repeated to every
  head) and output (4 × a·BTH) with its fp32 log-sum-exp (4·B·heads·T);
- a frozen FFN saves gate, up and the activation (3 × a·BTI); a trained one also
  its input and their product (a·BTH + 4 × a·BTI);
- a MoSE / token-MoE block saves its input, per FFN it runs (k routed + shared)
  gate‖up, the activation and their product (4 × a·BTI each), and, above the first
  block, the routed output the route weight scales (a·BTH);
- once per forward: the attention mask (a·BT², with padding), m-RoPE's cos and sin
  (2 × a·BT·head_dim), the final norm (4·BTH) and the log-softmax of the fp32 logits
  over the vocabulary at the N positions that predict an answer token (4·NV: the LM
  head runs there only), the largest term at Qwen's 151,936 tokens.

With gradient checkpointing (transformers' non-reentrant kind, per decoder layer)
the forward keeps each checkpointed layer's input (r·BTH: the residual stream, in
bf16 where a stage's frozen weights are held in it, else float32 under autocast)
and backward recomputes one layer at a time, so the peak adds the largest single
layer. The vision tower is frozen in every mose stage and saves nothing; its
no-grad forward is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mose.data.collate import IGNORE
from mose.estimate.models import ModelFacts

FP32 = 4


@dataclass(frozen=True)
class MicroBatch:
    batch: int  # samples per process per micro-batch
    seq: int  # padded tokens per sample, image tokens included
    image_tokens: int = 0  # per sample, after the spatial merge
    answers: int | None = None  # positions predicting an answer token, in all (None: every one)

    @classmethod
    def of(cls, collated: dict[str, torch.Tensor], merge: int) -> MicroBatch:
        """The shape of a collated batch (input_ids (B, T), image_grid_thw (images, 3), labels (B, T))."""
        batch, seq = collated["input_ids"].shape
        grid = collated.get("image_grid_thw")
        images = int(grid.prod(dim=-1).sum()) // (merge * merge) if grid is not None else 0
        labels = collated.get("labels")
        answers = int((labels[:, 1:] != IGNORE).sum()) if labels is not None else None
        return cls(batch=batch, seq=seq, image_tokens=images // batch, answers=answers)

    @property
    def predicting(self) -> int:
        """The positions the LM head runs at."""
        return self.batch * (self.seq - 1) if self.answers is None else self.answers


@dataclass(frozen=True)
class ActivationBytes:
    saved: int  # saved for backward by the whole forward (no checkpointing)
    checkpointed: int  # peak with per-layer gradient checkpointing
    logits: int  # of both: the fp32 log-softmax over the vocabulary

    def for_options(self, checkpointing: bool) -> int:
        return self.checkpointed if checkpointing else self.saved


def activation_bytes(facts: ModelFacts, shape: MicroBatch, trained_from: int | None = 0,
                     trained_ffns: frozenset[int] = frozenset(), act_bytes: int = 2,
                     residual_bytes: int = FP32) -> ActivationBytes:
    """Bytes per micro-batch. `trained_from`: the first decoder layer with a trained module
    (None: nothing trains through the decoder; -1: the embeddings train, so every layer's input
    needs a gradient); `trained_ffns`: dense FFNs that train; `residual_bytes`: of an element of
    the residual stream (what a checkpointed layer keeps)."""
    b, t, h = shape.batch, shape.seq, facts.hidden
    bt = b * t
    if trained_from is None:
        return ActivationBytes(0, 0, 0)
    per_layer = [_layer(facts, n, bt, b, t, act_bytes, n > trained_from, n in trained_ffns)
                 for n in range(max(trained_from, 0), facts.layers)]
    head_dim = h // facts.heads
    once = act_bytes * b * t * t + 2 * act_bytes * bt * head_dim + FP32 * bt * h + FP32 * bt
    logits = FP32 * shape.predicting * facts.vocab
    saved = sum(per_layer) + once + logits
    inputs = residual_bytes * bt * h * len(per_layer)  # each checkpointed layer's input
    checkpointed = inputs + max(per_layer, default=0) + once + logits
    return ActivationBytes(saved=saved, checkpointed=checkpointed, logits=logits)


def _layer(facts: ModelFacts, n: int, bt: int, b: int, t: int, a: int, input_grad: bool,
           ffn_trains: bool) -> int:
    h, i = facts.hidden, facts.intermediate
    attention = 0
    if input_grad:  # below the first trained module nothing needs a gradient
        attention = 2 * (FP32 * bt * h + FP32 * bt) + 4 * a * bt * h + FP32 * b * facts.heads * t
    if n in facts.blocks:
        routed, shared = facts.blocks[n]
        ffns = routed + int(shared)
        scaled = a * bt * h if input_grad else 0  # the route weight needs a gradient there
        return attention + a * bt * h + ffns * 4 * a * bt * i + scaled
    if ffn_trains:
        return attention + a * bt * h + 4 * a * bt * i
    return attention + (3 * a * bt * i if input_grad else 0)


def forward_bytes(facts: ModelFacts, shape: MicroBatch, act_bytes: int = 2) -> int:
    """A no-grad forward's transient peak (the router stage's pooling pass): one layer's
    residual, norm and FFN intermediates live at once, plus the attention mask."""
    bt = shape.batch * shape.seq
    return (3 * FP32 * bt * facts.hidden + 4 * act_bytes * bt * facts.intermediate
            + act_bytes * shape.batch * shape.seq * shape.seq)
