"""Model benchmark: prefill and decode throughput of converted models vs their dense backbone.

A Qwen2 text model at a CPU-sized width with Qwen2-VL-2B's FFN/hidden ratio
(`--full`: the 2B shape, 28 layers, for a GPU). MoE variants convert the even
layers: MoSE (shared + top-1 skill expert), our token MoE (4 experts top-1 +
shared) and transformers' Qwen2MoeForCausalLM at equal sizes. The FLOP ideal
counts projections, attention scores and the LM head per token.
"""

from __future__ import annotations

import copy

import torch
from common import device_line, medians, param_mib, parser, setup, table
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import mose


def backbone_config(full: bool) -> Qwen2Config:
    if full:  # Qwen2-VL-2B's language model
        shape = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2)
    else:
        shape = dict(hidden_size=256, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2)
    return Qwen2Config(vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False,
                       pad_token_id=0, eos_token_id=1, **shape)


def flops_per_token(cfg: Qwen2Config, context: float, extra_ffns: int) -> float:
    """Matmul FLOPs per token at a mean attention context; extra_ffns: FFN copies added."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    projections = 2 * (h * q + 2 * h * kv + q * h)
    scores = 2 * 2 * q * context
    ffn = 2 * 3 * h * i
    per_layer = projections + scores + ffn
    return cfg.num_hidden_layers * per_layer + extra_ffns * ffn + 2 * h * cfg.vocab_size


def hf_moe(cfg: Qwen2Config) -> Qwen2MoeForCausalLM:
    odd = list(range(1, cfg.num_hidden_layers, 2))
    moe = Qwen2MoeConfig(**{k: v for k, v in cfg.to_dict().items() if k in Qwen2MoeConfig.__dataclass_fields__
                            and k not in ("model_type", "architectures")},
                         moe_intermediate_size=cfg.intermediate_size,
                         shared_expert_intermediate_size=cfg.intermediate_size,
                         num_experts=4, num_experts_per_tok=1, norm_topk_prob=True,
                         mlp_only_layers=odd, qkv_bias=True)
    return Qwen2MoeForCausalLM(moe)


def build(cfg: Qwen2Config, device, dtype) -> dict[str, tuple[torch.nn.Module, int]]:
    """name → (model, FFN copies added over the dense model)."""
    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(cfg).eval()
    moe_layers = len(range(0, cfg.num_hidden_layers, 2))
    models = {
        "dense": (dense, 0),
        "MoSE shared+top1": (mose.convert(copy.deepcopy(dense), mose.MoSEConfig()), moe_layers),
        "token MoE 4x1 +shared": (mose.convert(copy.deepcopy(dense), mose.TokenMoEConfig(
            num_experts=4, shared_expert=True)), moe_layers),
        "HF Qwen2MoeForCausalLM 4x1 +shared": (hf_moe(cfg).eval(), moe_layers),
    }
    return {name: (m.to(device, dtype), extra) for name, (m, extra) in models.items()}


def spread_labels(batch: int, device) -> torch.Tensor:
    """Forced routes spread over skills, as a batch of different questions would be."""
    return (torch.arange(batch, device=device)[:, None] + torch.arange(3, device=device)).remainder(5)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="Qwen2-VL-2B's language model shape")
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = backbone_config(args.full)
    batch, prompt, new = (2, 64, 8) if args.quick else (4, 256, 32)
    models = build(cfg, device, dtype)
    print(f"# Model benchmark — hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
          f"{cfg.num_hidden_layers} layers, batch {batch}, prompt {prompt}, {new} new tokens; "
          f"{device_line(device, dtype)}")
    ids = torch.randint(2, cfg.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    labels = spread_labels(batch, device)

    def prefill(model, **kw):
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)

    def generate(model, **kw):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, **kw)

    mose_model = models["MoSE shared+top1"][0]
    runs = {}
    for name, (model, _) in models.items():
        runs[name] = (prefill(model), generate(model))
    runs["MoSE, routes spread over skills"] = (prefill(mose_model, skill_labels=labels),
                                               generate(mose_model, skill_labels=labels))
    same = torch.zeros_like(labels)
    runs["MoSE, batch shares one skill"] = (prefill(mose_model, skill_labels=same),
                                            generate(mose_model, skill_labels=same))

    def running(fn):
        def run():
            mose_model.set_decode_routing("running")
            try:
                return fn()
            finally:
                mose_model.set_decode_routing("once")
        return run

    runs["MoSE, running routing"] = (prefill(mose_model), running(generate(mose_model)))
    extra = {name: models.get(name, (None, models["MoSE shared+top1"][1]))[1] for name in runs}

    with torch.no_grad():
        pre = medians({n: r[0] for n, r in runs.items()}, device, args.repeats, args.warmup)
        gen = medians({n: r[1] for n, r in runs.items()}, device, max(3, args.repeats // 3), 1)
    def decode_speed(name: str) -> float:
        # generate() = one prefill over the prompt + (new - 1) cached decode steps.
        return batch * (new - 1) / max(gen[name] - pre[name], 1e-9)

    rows = []
    for name in runs:
        ideal_pre = flops_per_token(cfg, prompt / 2, extra[name]) / flops_per_token(cfg, prompt / 2, 0)
        context = prompt + new / 2
        ideal_dec = flops_per_token(cfg, context, extra[name]) / flops_per_token(cfg, context, 0)
        pre_ratio = pre[name] / pre["dense"]
        speed = decode_speed(name) / decode_speed("dense")
        rows.append([name, f"{batch * prompt / pre[name]:.0f}", pre_ratio, ideal_pre,
                     pre_ratio / ideal_pre, f"{decode_speed(name):.0f}", speed, 1 / ideal_dec,
                     speed * ideal_dec, f"{param_mib(models.get(name, (mose_model,))[0]):.1f}"])
    table("prefill (forward over the prompt) and decode (generate minus its prefill)",
          ["model", "prefill tok/s", "prefill × dense", "ideal ×", "÷ ideal",
           "decode tok/s", "decode speed × dense", "ideal speed ×", "speed ÷ ideal", "params MiB"],
          rows)



if __name__ == "__main__":
    main()
