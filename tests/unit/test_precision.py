"""Weights held in a lower precision for a while (`mose.train.precision`), given back bit for bit."""

from __future__ import annotations

import torch

import mose
from mose.layers import Router
from mose.train.precision import held_in, weights


def test_held_weights_come_back_exactly_whether_the_low_precision_holds_them_or_not(tiny):
    model = mose.convert(tiny("qwen2_vl")[0], mose.MoSEConfig())
    exact = model.lm_head.weight
    with torch.no_grad():
        exact.copy_(exact.bfloat16().float())  # a weight published in bf16, loaded in float32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    held = weights(model)
    assert held and not routers & {id(p) for p in held}
    with held_in(held, torch.bfloat16):
        assert {p.dtype for p in held} == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for m in model.modules() if isinstance(m, Router)
                   for p in m.parameters())
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))  # it answers meanwhile
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], v) for n, v in before.items())


def test_only_frozen_weights_are_held_when_asked(tiny):
    model = tiny("qwen2_vl")[0]
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    frozen = weights(model, frozen_only=True)
    ids = {id(p) for p in frozen}
    assert id(model.lm_head.weight) not in ids and id(model.model.visual.patch_embed.proj.weight) in ids
