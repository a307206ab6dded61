"""Scaling benchmark: a MoSE block's cost against its number of skills, at top-1.

Routing per sample runs each chosen expert once, so time should stay flat as
skills grow (the batch is spread over min(B, S) experts) while parameters grow
linearly.
"""

from __future__ import annotations

import torch
from common import device_line, medians, param_mib, parser, setup, table
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from mose import MoSEConfig
from mose.inject import mose_block
from mose.routing import RoutingState


def taxonomy(num_skills: int) -> dict:
    skills = ["general"] + [f"skill_{i}" for i in range(1, num_skills)]
    return {"name": f"{num_skills}-skills", "levels": [{"name": "perception", "skills": skills}]}


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    device, dtype = setup(args)
    hidden, inter, batch, seq = 256, 1536, 8, 128
    counts = [2, 4, 8] if args.quick else [2, 4, 8, 16, 32]
    print(f"# Scaling benchmark — hidden {hidden}, FFN {inter}, batch {batch} × seq {seq}; "
          f"{device_line(device, dtype)}")
    dense = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter)).to(device, dtype)
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    blocks, runs = {}, {}
    for n in counts:
        cfg = MoSEConfig(taxonomy=taxonomy(n), layers=[0])
        block = mose_block(dense, cfg, RoutingState(), 0, 0)
        # Samples spread over as many skills as the batch allows.
        block.state.begin(seq_len=seq, attention_mask=None, image_mask=None, past_length=0,
                          decode_routing="once",
                          skill_labels=torch.arange(batch, device=device).remainder(n)[:, None])
        blocks[n] = block
        runs[n] = (lambda b: lambda: (b.observe(x), b(x)))(block)
    with torch.no_grad():
        times = medians(runs, device, args.repeats, args.warmup)
    base = counts[0]
    rows = [[n, min(n, batch), f"{times[n] * 1e3:.2f}", times[n] / times[base],
             f"{param_mib(blocks[n]):.1f}", param_mib(blocks[n]) / param_mib(blocks[base])]
            for n in counts]
    table("MoSE block forward vs number of skills (top-1, shared expert)",
          ["skills", "experts used", "ms", f"time × {base} skills", "params MiB",
           f"params × {base} skills"], rows)


if __name__ == "__main__":
    main()
