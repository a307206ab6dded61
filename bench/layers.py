"""Layer benchmark: one FFN replacement against the dense FFN it came from.

Widths keep Qwen2-VL-2B's FFN/hidden ratio (8960 / 1536 ≈ 5.8), scaled to fit
the CPU; `--full` uses the real 2B widths (for a GPU). The ideal is the FLOP
ratio: (1 + k) × dense for MoSE with a shared expert, k × dense for a token
MoE without one.

`--compile` adds forward rows for the dense FFN, the MoSE block and the token MoE run
under `torch.compile` (inductor; a C++ compiler is needed on the CPU), each against
the eager dense FFN: the dispatch has no host sync, so a block is one graph.
"""

from __future__ import annotations

import torch
from common import device_line, medians, param_mib, parser, peak_memory, setup, table
from transformers import Qwen2Config, Qwen2MoeConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from mose import MoSEConfig, TokenMoEConfig
from mose.inject import mose_block, token_moe_block
from mose.routing import RoutingState


def build_variants(hidden: int, inter: int, device, dtype):
    """name → (module, flop ideal vs dense, MoSE block or None)."""
    torch.manual_seed(0)
    dense = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter)).to(device, dtype)
    variants = {"dense FFN": (dense, 1.0)}
    for name, cfg, ideal in [
        ("MoSE shared+top1", MoSEConfig(), 2.0),
        (ONE_ROUTE, MoSEConfig(), 2.0),
        ("MoSE groups shared+top1", MoSEConfig(modality_groups=True), 2.0),
    ]:
        variants[name] = (mose_block(dense, cfg, RoutingState(), 0, 0), ideal)
    for experts in (4, 8):
        for shared in (False, True):
            cfg = TokenMoEConfig(num_experts=experts, shared_expert=shared)
            label = f"token MoE {experts}x1" + (" +shared" if shared else "")
            variants[label] = (token_moe_block(dense, cfg, RoutingState(), 0), 2.0 if shared else 1.0)
        hf = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=hidden, moe_intermediate_size=inter, shared_expert_intermediate_size=inter,
            num_experts=experts, num_experts_per_tok=1, norm_topk_prob=True)).to(device, dtype)
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.02)
        variants[f"HF Qwen2MoeSparseMoeBlock {experts}x1 +shared"] = (hf, 2.0)
    return variants


# A batch whose samples share one route, known on the host: what `mose predict`'s route groups
# decode (`Route.common`). The other MoSE rows spread the batch over 5 skills, so a decode step
# reads 1 + 5 FFNs' weights where the FLOP ideal counts 2.
ONE_ROUTE = "MoSE shared+top1, one route"
COMMON = {ONE_ROUTE: (0,)}  # the experts its batch shares: skill 0's


def prepare(module, x: torch.Tensor, num_skills: int = 5) -> None:
    """Give a block its routing inputs: samples spread over skills, a quarter image tokens."""
    state = getattr(module, "state", None)
    if state is None:
        return
    batch, seq, _ = x.shape
    state.begin(seq_len=seq, attention_mask=None, past_length=0, decode_routing="once",
                image_mask=torch.arange(seq, device=x.device).expand(batch, -1) < seq // 4,
                skill_labels=torch.arange(batch, device=x.device).remainder(num_skills)[:, None])


COMPILED = ("dense FFN", "MoSE shared+top1", ONE_ROUTE, "token MoE 4x1 +shared")  # --compile's rows


def step(module, x: torch.Tensor, backward: bool, compiled: bool = False,
         common: tuple[int, ...] | None = None):
    """One call of a variant; `common`: the experts the whole batch shares, told to its route
    as route groups do (compiled rows are not told: a compiled block dispatches on the device
    whatever the route, so that one graph serves every route)."""
    def run():
        if hasattr(module, "observe"):
            module.observe(x)
            if common is not None:
                module.state.routes[module.layer_idx].common = common
        out = module(x)
        if backward:
            module.zero_grad(set_to_none=True)  # as an optimizer step would leave them
            out.float().sum().backward()
        return out

    return torch.compile(run, fullgraph=True) if compiled else run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="Qwen2-VL-2B widths: hidden 1536, FFN 8960")
    p.add_argument("--compile", action="store_true", help="also torch.compile'd forward rows")
    args = p.parse_args()
    device, dtype = setup(args)
    hidden, inter = (1536, 8960) if args.full else (256, 1536)
    shapes = [(8, 128), (4, 512), (8, 1)]
    if args.quick:
        shapes = [(4, 64), (8, 1)]
    print(f"# Layer benchmark — hidden {hidden}, FFN {inter}; {device_line(device, dtype)}")
    variants = build_variants(hidden, inter, device, dtype)
    for batch, seq in shapes:
        for backward in ((False, True) if seq > 1 else (False,)):
            x = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=backward)
            for name, (module, _) in variants.items():
                module.requires_grad_(backward)
                prepare(module, x, num_skills=1 if name == ONE_ROUTE else 5)
            runs = {name: step(m, x, backward, common=COMMON.get(name)) for name, (m, _) in variants.items()}
            shown = dict(variants)
            if args.compile and not backward:
                # Every variant's `run` is one code object to dynamo, whose recompile limit
                # (8) the rows of all shapes together pass: start each shape afresh.
                torch._dynamo.reset()
                for name in COMPILED:
                    shown[f"{name} (compiled)"] = variants[name]
                    runs[f"{name} (compiled)"] = step(variants[name][0], x, False, compiled=True)
            with torch.set_grad_enabled(backward):
                times = medians(runs, device, args.repeats, args.warmup)
                mem = {name: peak_memory(runs[name], device, m)
                       for name, (m, _) in variants.items()}  # compiled forwards save nothing either
            base = times["dense FFN"]
            rows = [[name, f"{times[name] * 1e3:.2f}", times[name] / base, ideal,
                     (times[name] / base) / ideal, f"{param_mib(m):.1f}", f"{mem.get(name, 0.0):.1f}"]
                    for name, (m, ideal) in shown.items()]
            mode = "forward+backward" if backward else "forward"
            table(f"{mode}, batch {batch} × seq {seq}",
                  ["variant", "ms", "× dense", "ideal ×", "÷ ideal", "params MiB",
                   "peak MiB" if device.type == "cuda" else "saved-for-backward MiB"], rows)


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()
