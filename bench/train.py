"""Training benchmark: what each stage's step costs against what it must cost.

A tiny Qwen2-VL at a CPU-sized width with Qwen2-VL-2B's FFN/hidden ratio
(`--full`: the 2B language model's shape, for a GPU) on batches of the
procedural driving world (images + questions). Compared, as ratios to a
baseline in the same process:

- the router stage's step against one forward pass of the same model;
- MoSE SFT against dense SFT of the same FFNs, and against its FLOP ideal
  (dense SFT plus the shared expert's forward, input-gradient and weight-gradient);
- token-MoE SFT (4 experts top-1 + shared: the same active FFNs) against MoSE SFT;
- peak memory of each; collating a batch as a share of a step;
- samples/s of a whole `train_stage` (logging, progress, resume states) against its bare steps.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from common import device_line, medians, parser, peak_memory, setup, table

import mose
from mose.data import read_jsonl
from mose.data.collate import Collator, EncodedDataset, SampleEncoder
from mose.data.world import generate
from mose.layers import expert_blocks
from mose.train.data import BatchOrder
from mose.train.loop import LoopContext, StagePlan, adamw, freeze_all_but, train_stage
from mose.train.recipe import BackboneStage, SFTStage
from mose.train.router_fit import PooledInputs, pooled_skill_loss
from mose.train.run import make_accelerator
from mose.train.stages import answer_objective, backbone_plan, sft_plan


def shape(full: bool) -> dict[str, int]:
    if full:  # Qwen2-VL-2B's language model (head_dim 128 there; tiny models keep 32)
        return dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=48, num_key_value_heads=8)
    return dict(hidden_size=256, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2)


def ffn_flops(h: int, i: int) -> float:
    return 2 * 3 * h * i


def sft_ideal(h: int, i: int, layers: int, vocab: int, tokens_context: float, mose_layers: int) -> float:
    """(MoSE SFT step) / (dense SFT of the same FFNs) in matmul FLOPs per token.

    Forward over everything; input gradients above layer 0's FFN (nothing below
    it trains); weight gradients of the trained FFNs. MoSE adds, per MoSE layer,
    one more FFN (the shared expert) in all three.
    """
    attn = 2 * 4 * h * h + 2 * 2 * h * tokens_context  # projections (q, k, v, o as h×h) + scores
    forward = layers * (attn + ffn_flops(h, i)) + 2 * h * vocab
    input_grads = forward - attn
    dense = forward + input_grads + mose_layers * ffn_flops(h, i)
    return (dense + 3 * mose_layers * ffn_flops(h, i)) / dense


def step_fn(model, objective, batch, lr=1e-4):
    """One optimizer step of `objective` over the model's trainable parameters, as the loop takes it."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr, weight_decay=0.0)

    def step(given=None):
        loss = objective(model, batch if given is None else given)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, params


def router_stage_batch(model):
    """What the router stage spends on a batch in its first epoch: the pooling forward (no_grad,
    routes forced, stopped at the last router) and the skill loss on the pooled inputs; later
    epochs reuse the pooled inputs and pay for the loss alone."""
    blocks = expert_blocks(model)
    routers = {b.layer_idx: b.router for b in blocks}
    levels = {b.layer_idx: b.level for b in blocks}

    def objective(_model, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "skill_labels")}
        with torch.no_grad(), model.routing_only():
            model(**inputs, skill_labels=batch["skill_labels"])
        pooled = PooledInputs(dict(model.mose_state.router_inputs), batch["skill_labels"])
        return pooled_skill_loss(routers, levels, pooled)

    return objective


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="Qwen2-VL-2B's language model shape")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    device, dtype = setup(args)
    stage_steps = 10 if args.quick else 40
    dense, processor = mose.tiny_model("qwen2_vl", seed=0, **shape(args.full))
    dense.to(device, dtype).train()
    cfg = dense.config.text_config
    folder = Path(tempfile.mkdtemp(prefix="mose-bench-"))
    samples = list(read_jsonl(generate("driving", n=max(64, args.batch * 4), seed=0, out=folder)))
    taxonomy = mose.load_taxonomy("driving")
    dataset = EncodedDataset(samples, SampleEncoder(processor, taxonomy))
    collator = Collator(processor.tokenizer.pad_token_id, padding_side="right")
    batch = {k: v.to(device) for k, v in collator(dataset.items[: args.batch]).items()}
    tokens = int(batch["attention_mask"].sum()) / args.batch

    moe = mose.convert(copy.deepcopy(dense), mose.MoSEConfig(taxonomy="driving"))
    token_moe = mose.convert(copy.deepcopy(dense), mose.TokenMoEConfig(num_experts=4, shared_expert=True))
    router_model, stage_model = copy.deepcopy(moe), copy.deepcopy(moe)
    freeze_all_but(dense, backbone_plan("dense", dense, BackboneStage(trainable="ffn"), dataset).trainable)
    freeze_all_but(moe, sft_plan("sft", moe, SFTStage(), dataset).trainable)
    freeze_all_but(token_moe, sft_plan("sft", token_moe, SFTStage(), dataset).trainable)
    freeze_all_but(router_model, [b.router for b in expert_blocks(router_model)])

    router_step, router_params = step_fn(router_model, router_stage_batch(router_model), batch, lr=1e-3)
    dense_step, dense_params = step_fn(dense, answer_objective(dense), batch)
    moe_step, moe_params = step_fn(moe, answer_objective(moe), batch)
    token_step, token_params = step_fn(token_moe, answer_objective(token_moe, aux_loss_coef=0.01), batch)

    def forward():
        with torch.no_grad():
            router_model(**{k: v for k, v in batch.items() if k not in ("labels", "skill_labels")})

    def collate():
        collator([dataset[i] for i in range(args.batch)])

    variants = {"forward pass (no_grad)": forward, "router step": router_step,
                "dense SFT (same FFNs)": dense_step, "MoSE SFT": moe_step,
                "token MoE 4x1 +shared SFT": token_step, "collate a batch": collate}
    times = medians(variants, device, args.repeats, args.warmup)
    memory = {name: peak_memory(fn, device, model) for name, fn, model in (
        ("router step", router_step, router_model), ("dense SFT (same FFNs)", dense_step, dense),
        ("MoSE SFT", moe_step, moe), ("token MoE 4x1 +shared SFT", token_step, token_moe))}
    trained = {"router step": router_params, "dense SFT (same FFNs)": dense_params,
               "MoSE SFT": moe_params, "token MoE 4x1 +shared SFT": token_params}

    bare_s = bare_steps(copy.deepcopy(stage_model), dataset, collator, stage_steps, args.batch, device)
    stage_s = whole_stage(copy.deepcopy(stage_model), dataset, collator, stage_steps, args.batch, folder, 0)
    saving_s = whole_stage(stage_model, dataset, collator, stage_steps, args.batch, folder, stage_steps // 2)

    print(f"# Training benchmark — hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
          f"{cfg.num_hidden_layers} layers (MoSE on the even ones), batch {args.batch} of "
          f"~{tokens:.0f} tokens (images included); {device_line(device, dtype)}")
    mose_layers = len(range(0, cfg.num_hidden_layers, 2))
    ideal = sft_ideal(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size,
                      tokens / 2, mose_layers)
    per_sample = {name: args.batch / t for name, t in times.items()}
    rows = [
        ["router step ÷ forward pass", times["router step"] / times["forward pass (no_grad)"], "≤ 1.10"],
        ["MoSE SFT ÷ dense SFT (same FFNs)", times["MoSE SFT"] / times["dense SFT (same FFNs)"],
         f"≤ 1.10 × {ideal:.3f} (FLOP ideal) = {1.1 * ideal:.3f}"],
        ["token MoE SFT ÷ MoSE SFT", times["token MoE 4x1 +shared SFT"] / times["MoSE SFT"],
         "same active FFNs: ideal 1.0"],
        ["collating a batch ÷ MoSE SFT step", times["collate a batch"] / times["MoSE SFT"], "≤ 0.05"],
        ["whole stage samples/s ÷ its bare steps", bare_s / stage_s, "≥ 0.90"],
        [f"the same, with a resume state every {stage_steps // 2} steps", bare_s / saving_s,
         "(what saving costs)"],
    ]
    table("ratios against their targets", ["figure", "ratio", "target"], rows)
    table("steps", ["step", "ms", "samples/s", "trainable params (M)", "saved for backward MiB",
                    "grads + AdamW state MiB"],
          [[name, f"{times[name] * 1e3:.1f}", f"{per_sample[name]:.1f}",
            f"{sum(p.numel() for p in trained[name]) / 1e6:.2f}" if name in trained else "",
            f"{memory[name]:.1f}" if name in memory else "",
            f"{3 * sum(p.numel() * p.element_size() for p in trained[name]) / 2**20:.1f}"
            if name in trained else ""]
           for name in variants])


def bare_steps(model, dataset, collator, steps: int, batch: int, device) -> float:
    """Seconds per step of the same steps `whole_stage` takes, on batches collated beforehand."""
    options = SFTStage(max_steps=steps, batch_size=batch)
    freeze_all_but(model, sft_plan("sft", model, options, dataset).trainable)
    model.train()
    step, _ = step_fn(model, answer_objective(model), None)
    order = BatchOrder(len(dataset), batch, 1, 1, seed=0)
    rows = [order.micro_batches(s, rank=0)[0] for s in range(steps)]  # grad_accum 1: one micro-batch
    batches = [{k: v.to(device) for k, v in collator([dataset[i] for i in r]).items()} for r in rows]
    for one in batches[:2]:  # warm-up; the stage gets none, so the ratio is conservative
        step(one)
    begin = time.perf_counter()
    for one in batches:
        step(one)
    return (time.perf_counter() - begin) / steps


def whole_stage(model, dataset, collator, steps: int, batch: int, folder: Path, save_every: int) -> float:
    """Seconds per step of a real `train_stage`: its logging, progress bar and resume states."""
    options = SFTStage(max_steps=steps, batch_size=batch, lr=1e-4, log_every=10, save_every=save_every)
    plan = StagePlan("sft", options, dataset, sft_plan("sft", model, options, dataset).trainable,
                     answer_objective(model))
    ctx = LoopContext(make_accelerator("no"), collator, seed=0, resume_dir=folder / "resume",
                      log_dir=folder / "logs", progress=True)
    begin = time.perf_counter()
    train_stage(model, plan, ctx, resume=False)
    return (time.perf_counter() - begin) / steps


if __name__ == "__main__":
    main()
