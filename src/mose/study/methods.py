"""The methods a study compares, as recipe stages.

Every method fine-tunes the same FFN positions (the even decoder layers) of the
same starting model on the same answer data with the same options (`finetune`):
- `dense_sft`: those FFNs themselves (the paper's Qwen2-VL_SFT);
- `moe_4x1`, `moe_8x1`: token-level MoE upcycled from them, 4 or 8 experts top-1
  beside a shared expert, with a load-balancing loss (Qwen2-VL_MoE_41 / _81);
- `mose`: MoSE (a shared expert and one expert per skill), its routers pretrained
  on skill labels first (`router`: routers only, no backward through the model;
  the stage holds out a labelled split and reports its routers' accuracy there),
  then skill by skill: fine-tuning routes each sample by its labelled chain
  (teacher forcing), so every expert learns its own skill's samples, and a last
  router stage (`refit`, the same options) fits the routers again on what the
  fine-tuned layers give them. (Routers fitted before fine-tuning alone read
  hidden states that fine-tuning changed below them, and route far worse on
  test than at their stage: README, "The demo".)
- `mose_groups`: MoSE with expert groups (an image and a text expert per skill),
  the same router pretraining;
- `mose_oracle`: MoSE whose routes are forced to the labelled skill chain, in
  fine-tuning (teacher forcing) and at test (each test record's own `skills`).
  It reads the test split's labels, so it is an upper bound on what routing
  could give, never a result; it has no router stage (its routers are unused).
- `mose_question`: MoSE on the question taxonomy (the study's `question_taxonomy`,
  e.g. `driving-question`): skills the question fixes (what it points at, which
  behaviour it asks about, whether it asks for a decision), never what the answer
  is, labelled by the `question_rules` (e.g. `world-driving-question`) on the
  training and test splits; the same router pretraining as `mose`.

- `mose_lora`, `moe_4x1_lora`: `mose` and `moe_4x1` with LoRA experts
  (`experts: lora`, rank `LORA_RANK`): the FFN frozen, a shared and a routed
  low-rank delta of it, like for like.

The token MoEs keep a shared expert so that a token uses two FFNs in every
method but dense SFT: the paper matches the experts MoSE activates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    label: str  # as tables show it
    mose: bool  # a MoSE model: skill experts, a taxonomy, a skill chain with every answer
    oracle: bool = False  # routes forced to the labelled chain in training and at test (an upper bound)
    question_skills: bool = False  # the study's question taxonomy and rules, not its content taxonomy
    lora: bool = False  # LoRA experts: low-rank deltas of the frozen FFN, not full copies of it

    @property
    def routed(self) -> bool:
        """Its own routers choose the routes: they are pretrained on skill labels first."""
        return self.mose and not self.oracle


ORACLE_NOTE = ("† routes forced to the labelled skill chain in fine-tuning and at test: it reads the test "
               "split's labels, so it is an upper bound on routing, not a result")
METHODS = {
    "dense_sft": Method("dense SFT", mose=False),
    "moe_4x1": Method("MoE 4×1", mose=False),
    "moe_8x1": Method("MoE 8×1", mose=False),
    "mose": Method("MoSE", mose=True),
    "mose_groups": Method("MoSE + groups", mose=True),
    "mose_lora": Method("MoSE, LoRA experts", mose=True, lora=True),
    "moe_4x1_lora": Method("MoE 4×1, LoRA experts", mose=False, lora=True),
    "mose_oracle": Method("MoSE oracle routes (upper bound) †", mose=True, oracle=True),
    # Last: its runs read their own labelled file, so those of the other methods share encodings.
    "mose_question": Method("MoSE, question skills", mose=True, question_skills=True),
}
FINE_TUNE, REFIT = "sft", "refit"
LORA_RANK = 16


def final_stage(method: str) -> str:
    """The method's last stage: the model a study evaluates."""
    return REFIT if METHODS[method].routed else FINE_TUNE


def method_stages(method: str, finetune: dict[str, Any], router: dict[str, Any] | None = None,
                  taxonomy: str | None = None, labelled: str | None = None,
                  oracle_data: str | None = None, sft_data: str | None = None) -> dict[str, Any]:
    """The recipe stages of a method (run from a dense model).

    Args:
        finetune: training options of the final `sft` stage (max_steps or epochs, lr, batch_size, ...).
        router: router-stage options (methods with routers): labelled, epochs, ... (the stage's own
            defaults for the rest, its held-out split included).
        taxonomy: MoSE's skills.
        labelled: the skill-labelled records the routers learn from.
        oracle_data: the records `mose_oracle` fine-tunes on, every one skill-labelled (None: the
            recipe's data.train, as the procedural world's records are).
        sft_data: the records a routed MoSE method fine-tunes on (None: the recipe's data.train);
            `mose_question` takes the training split labelled with its own taxonomy's skills,
            since a record's skills must be the model's to be encoded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    sft = {"stage": "sft", **finetune}
    if method == "dense_sft":
        return {"sft": {**sft, "stage": "backbone", "trainable": "ffn", "layers": "even"}}
    lora = {"experts": "lora", "lora_rank": LORA_RANK} if METHODS[method].lora else {}
    if method.startswith("moe_"):
        experts = 8 if method == "moe_8x1" else 4
        return {"convert": {"token_moe": {"num_experts": experts, "top_k": 1, "shared_expert": True,
                                          **lora}},
                "sft": sft}
    if taxonomy is None:
        raise ValueError(f"{method} needs a taxonomy")
    mose = {"taxonomy": taxonomy, "modality_groups": method == "mose_groups", **lora}
    if METHODS[method].oracle:  # routed by the labels: the routers neither train nor choose
        forced = {"teacher_forcing": True, "train_routers": False,
                  **({"data": oracle_data} if oracle_data else {})}
        return {"convert": {"mose": mose}, "sft": {**sft, **forced}}
    if labelled is None:
        raise ValueError(f"{method} needs skill-labelled records for its routers")
    router_stage = {"stage": "router", "data": labelled, **(router or {})}
    skill_by_skill = {"teacher_forcing": True, "train_routers": False,
                      **({"data": sft_data} if sft_data else {})}
    return {"convert": {"mose": mose}, "router": router_stage, FINE_TUNE: {**sft, **skill_by_skill},
            REFIT: router_stage}
