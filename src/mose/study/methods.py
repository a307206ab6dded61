"""The methods a study compares, as recipe stages.

Every method fine-tunes the same FFN positions (the even decoder layers) of the
same starting model on the same answer data with the same options (`finetune`):
- `dense_sft`: those FFNs themselves (the paper's Qwen2-VL_SFT);
- `moe_4x1`, `moe_8x1`: token-level MoE upcycled from them, 4 or 8 experts top-1
  beside a shared expert, with a load-balancing loss (Qwen2-VL_MoE_41 / _81);
- `mose`: MoSE (a shared expert and one expert per skill), its routers pretrained
  on skill labels first (`router`: routers only, no backward through the model);
- `mose_groups`: MoSE with expert groups (an image and a text expert per skill),
  the same router pretraining.

The token MoEs keep a shared expert so that a token uses two FFNs in every
method but dense SFT: the paper matches the experts MoSE activates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    label: str  # as tables show it
    mose: bool  # has skill routers (router pretraining, skill chains)


METHODS = {
    "dense_sft": Method("dense SFT", mose=False),
    "moe_4x1": Method("MoE 4×1", mose=False),
    "moe_8x1": Method("MoE 8×1", mose=False),
    "mose": Method("MoSE", mose=True),
    "mose_groups": Method("MoSE + groups", mose=True),
}
FINAL_STAGE = "sft"  # every method's last stage: the model a study evaluates


def method_stages(method: str, finetune: dict[str, Any], router: dict[str, Any] | None = None,
                  taxonomy: str | None = None, labelled: str | None = None) -> dict[str, Any]:
    """The recipe stages of a method (run from a dense model).

    Args:
        finetune: training options of the final `sft` stage (max_steps or epochs, lr, batch_size, ...).
        router: router-stage options (MoSE methods): labelled, max_steps, lr, ...
        taxonomy: MoSE's skills.
        labelled: the skill-labelled records the routers learn from.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    sft = {"stage": "sft", **finetune}
    if method == "dense_sft":
        return {"sft": {**sft, "stage": "backbone", "trainable": "ffn", "layers": "even"}}
    if method in ("moe_4x1", "moe_8x1"):
        experts = 4 if method == "moe_4x1" else 8
        return {"convert": {"token_moe": {"num_experts": experts, "top_k": 1, "shared_expert": True}},
                "sft": sft}
    if taxonomy is None or labelled is None:
        raise ValueError(f"{method} needs a taxonomy and skill-labelled records for its routers")
    mose = {"taxonomy": taxonomy, "modality_groups": method == "mose_groups"}
    return {"convert": {"mose": mose}, "router": {"data": labelled, "eval_size": 0, **(router or {})},
            "sft": sft}
