"""LoRA skill experts' cost: trainable parameters, SFT memory and step time at real widths.

A tiny Qwen2-VL with Qwen2-VL-2B's language-model widths (hidden 1536, FFN 8960;
`--layers` decoder layers, MoSE on the even ones) takes one SFT optimizer step on a
batch of the procedural driving world, four ways, as ratios in the same process:

- dense LoRA SFT: PEFT's LoRA of rank r on the same layers' FFN projections (gate,
  up, down): one delta, no routing — the baseline a LoRA user knows;
- LoRA-MoSE SFT: `MoSEConfig(experts="lora", lora_rank=r)`, the FFN frozen, a shared
  and a routed delta of rank r per MoSE layer (two deltas per sample, against one);
- MoSE SFT with full experts (the paper's): a trained copy of the FFN per skill;
- dense SFT of the same FFNs (every FFN weight trained).

The target (issue 17): a LoRA-MoSE step within 1.15× a dense LoRA step of the same rank.
Memory on the CPU is what autograd saves for backward plus the trained parameters'
gradients and AdamW moments (3 × their bytes); on CUDA, the step's peak allocation.

    python lora.py                  # 6 layers, batch 4, rank 16 (CPU: about 5 minutes)
    python lora.py --quick          # hidden 256, 3 repeats (a smoke run)
    python lora.py --device cuda --layers 28 --batch 8
"""

from __future__ import annotations

import copy
import tempfile

from common import device_line, medians, parser, peak_memory, setup, table
from peft import LoraConfig, get_peft_model
from train import shape, step_fn

import mose
from mose.data import read_jsonl
from mose.data.collate import Collator, EncodedDataset, SampleEncoder
from mose.data.world import generate
from mose.train.loop import freeze_all_but
from mose.train.recipe import BackboneStage, SFTStage
from mose.train.stages import answer_objective, backbone_plan, sft_plan

TARGET = 1.15  # LoRA-MoSE SFT step ÷ dense LoRA SFT step


def dense_lora(model, rank: int, alpha: float, mose_layers: list[int]):
    """PEFT LoRA on the FFN projections of the layers MoSE would convert: its one delta per layer."""
    layers = "|".join(map(str, mose_layers))
    targets = rf".*language_model\.layers\.({layers})\.mlp\.(gate|up|down)_proj"
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=targets))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=6, help="decoder layers at the 2B widths (≥ 6: "
                   "3 MoSE layers for the 3 levels)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    device, dtype = setup(args)
    # --quick: train.py's CPU widths, a smoke run of the script rather than a figure
    widths = {**shape(full=not args.quick), "num_hidden_layers": args.layers}
    dense, processor = mose.tiny_model("qwen2_vl", seed=0, **widths)
    dense.to(device, dtype).train()
    folder = tempfile.mkdtemp(prefix="mose-bench-lora-")
    samples = list(read_jsonl(generate("driving", n=max(32, 4 * args.batch), seed=0, out=folder)))
    dataset = EncodedDataset(samples, SampleEncoder(processor, mose.load_taxonomy("driving")))
    collator = Collator(processor.tokenizer.pad_token_id, padding_side="right")
    batch = {k: v.to(device) for k, v in collator(dataset.items[: args.batch]).items()}
    tokens = int(batch["attention_mask"].sum()) / args.batch

    lora_cfg = mose.MoSEConfig(taxonomy="driving", experts="lora", lora_rank=args.rank)
    models = {
        "dense LoRA SFT": dense_lora(copy.deepcopy(dense), args.rank, lora_cfg.lora_alpha,
                                     list(range(0, args.layers, 2))),
        "LoRA-MoSE SFT": mose.convert(copy.deepcopy(dense), lora_cfg),
        "MoSE SFT (full experts)": mose.convert(copy.deepcopy(dense), mose.MoSEConfig(taxonomy="driving")),
        "dense SFT (same FFNs)": dense,
    }
    for name, model in models.items():
        if name == "dense SFT (same FFNs)":
            freeze_all_but(model, backbone_plan("dense", model, BackboneStage(trainable="ffn"),
                                                dataset).trainable)
        elif name != "dense LoRA SFT":  # PEFT froze everything but its deltas
            freeze_all_but(model, sft_plan("sft", model, SFTStage(), dataset).trainable)
    steps = {name: step_fn(model, answer_objective(model), batch) for name, model in models.items()}
    times = medians({name: step for name, (step, _) in steps.items()}, device, args.repeats, args.warmup)
    saved = {name: peak_memory(step, device, models[name]) for name, (step, _) in steps.items()}

    print(f"# LoRA experts' cost — hidden {widths['hidden_size']}, FFN {widths['intermediate_size']}, "
          f"{args.layers} layers (MoSE on the even ones), rank {args.rank}, batch {args.batch} of "
          f"~{tokens:.0f} tokens; {device_line(device, dtype)}")
    base = "dense LoRA SFT"
    table("ratios against their targets", ["figure", "ratio", "target"], [
        ["LoRA-MoSE SFT step ÷ dense LoRA SFT step", times["LoRA-MoSE SFT"] / times[base], f"≤ {TARGET}×"],
        ["MoSE SFT (full experts) step ÷ LoRA-MoSE SFT step",
         times["MoSE SFT (full experts)"] / times["LoRA-MoSE SFT"], "(what LoRA saves)"],
        ["dense SFT (same FFNs) step ÷ dense LoRA SFT step",
         times["dense SFT (same FFNs)"] / times[base], "(what LoRA saves densely)"],
    ])
    memory = "peak allocated MiB" if device.type == "cuda" else "saved for backward MiB"
    table("steps", ["step", "ms", "trainable params (M)", memory, "grads + AdamW state MiB"], [
        [name, f"{times[name] * 1e3:.0f}", f"{sum(p.numel() for p in params) / 1e6:.2f}",
         f"{saved[name]:.0f}", f"{3 * sum(p.numel() * p.element_size() for p in params) / 2**20:.0f}"]
        for name, (_, params) in steps.items()])


if __name__ == "__main__":
    main()
