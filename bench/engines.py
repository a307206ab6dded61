"""Engine benchmark: answer tokens/s of `mose predict` with the torch engine against the vLLM engine.

Runs in the environment that has vLLM beside mose (`make test-engine` installs it as
.venv-engine; on a GPU, vLLM's CUDA wheels). The model is a tiny LoRA-MoSE Qwen2-VL
(or, with --full, one at Qwen2-VL-2B's widths with random weights) whose deltas all
differ and whose routers spread the questions over several chains; the questions are
the procedural driving world's, each with its image. Rows, all on the same questions:

- torch: `mose predict` as it ships (route groups), end to end: the baseline;
- vllm, end to end: `mose predict --engine vllm` (the routing pass, the export of
  the chains taken, the engine's start, generation);
- vllm, generation only: the same engine, warm, answering the same prompts with their
  adapters (what a long run or a server converges to).

Greedy decoding of a random model rarely stops early, so answers run to
--max-new-tokens; tokens are counted from the answers as written.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import device_line, parser, table

import mose
from mose.data import read_jsonl
from mose.data.collate import SampleEncoder, load_images
from mose.data.world import generate
from mose.eval.predict import GenerationOptions, predict
from mose.eval.predictions import read_predictions
from mose.export import chain_name, export_adapters
from mose.models.device import Placement, dtype_str
from mose.models.processor import save_processor
from mose.models.shapes import shape_model
from mose.serving.engine import EnginePrompt, VLLMEngine
from mose.serving.predict import predict_with_vllm


def lora_mose(full: bool, dtype: torch.dtype, seed: int = 0):
    """A LoRA-MoSE Qwen2-VL with distinct deltas and confident random routers."""
    if full:  # Qwen2-VL-2B's widths and depth, random weights, the tiny processor
        model, processor = shape_model("2b", dtype=dtype, seed=seed)
    else:
        model, processor = mose.tiny_model("qwen2_vl", seed=seed)
    model = mose.convert(model, mose.MoSEConfig(experts="lora", lora_rank=8)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "router") and hasattr(module, "experts"):
                for deltas in filter(None, (module.experts, getattr(module, "shared_expert", None))):
                    for target in deltas.targets:
                        a, b = deltas.A(target), deltas.B(target)  # (E, r, in), (E, out, r)
                        a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) / a.shape[-1] ** 0.5)
                        b.copy_(torch.randn(b.shape, generator=generator) * 0.3 / b.shape[-1] ** 0.5)
                weight = module.router.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 4.0)
    return model, processor


def answer_tokens(path: Path, tokenizer) -> int:
    return sum(len(tokenizer(p.answer, add_special_tokens=False)["input_ids"])
               for p in read_predictions(path).values())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="mose predict's --batch-size (torch engine)")
    p.add_argument("--full", action="store_true", help="Qwen2-VL-2B's widths (a GPU's job)")
    args = p.parse_args()
    if args.quick:
        args.questions, args.max_new_tokens, args.repeats = 16, 8, 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    where = Placement(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate("driving", args.questions, seed=0, out=tmp / "world", split="test")
        samples = list(read_jsonl(data))
        model, processor = lora_mose(args.full, dtype)
        model.save_pretrained(tmp / "model")
        save_processor(processor, tmp / "model")
        tokenizer = processor.tokenizer
        options = GenerationOptions(max_new_tokens=args.max_new_tokens)

        model = model.to(device)

        def torch_run(model) -> float:
            (tmp / "torch.jsonl").unlink(missing_ok=True)
            begin = time.perf_counter()
            predict(model, processor, samples, tmp / "torch.jsonl", batch_size=args.batch,
                    max_new_tokens=args.max_new_tokens, progress=False)
            return time.perf_counter() - begin

        torch_run(model)  # warm-up
        torch_s = statistics.median(torch_run(model) for _ in range(args.repeats))
        chains = {tuple(c["skill"] for c in p.skill_chain.values())
                  for p in read_predictions(tmp / "torch.jsonl").values()}

        begin = time.perf_counter()
        predict_with_vllm(str(tmp / "model"), samples, tmp / "vllm.jsonl", placement=where,
                          batch_size=args.batch, options=options, progress=False)
        vllm_s = time.perf_counter() - begin

        # The warm engine: the same prompts and adapters, generation alone.
        taken = {p.id: tuple(c["skill"] for c in p.skill_chain.values())
                 for p in read_predictions(tmp / "vllm.jsonl").values()}
        export_adapters(model.cpu(), tmp / "export", sorted(set(taken.values())), processor=processor,
                        progress=False)
        del model
        engine = VLLMEngine(tmp / "export", dtype=dtype_str(dtype))
        encoder = SampleEncoder(processor)
        prompts = [EnginePrompt(encoder.chat_text(s), chain_name(taken[s.id]), load_images(s, "bench"))
                   for s in samples]
        sampling = options.vllm_kwargs()
        engine.generate(prompts, sampling)  # warm-up
        times = []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            tokens = engine.generate(prompts, sampling)
            times.append(time.perf_counter() - begin)
        warm_s = statistics.median(times)
        # Counted as the other rows count: the answers as written, tokenized again.
        warm_tokens = sum(len(tokenizer(tokenizer.decode(t, skip_special_tokens=True).strip(),
                                        add_special_tokens=False)["input_ids"]) for t in tokens)

        ours = answer_tokens(tmp / "torch.jsonl", tokenizer)
        theirs = answer_tokens(tmp / "vllm.jsonl", tokenizer)
        same = sum(a.answer == b.answer for a, b in zip(read_predictions(tmp / "torch.jsonl").values(),
                                                       read_predictions(tmp / "vllm.jsonl").values(),
                                                       strict=True))
    base = ours / torch_s
    rows = [[f"torch (route groups), end to end (median of {args.repeats})", f"{torch_s:.2f}", ours,
             f"{base:.1f}", "1.00"],
            ["vllm, end to end (route, export, start, generate; once)", f"{vllm_s:.1f}", theirs,
             f"{theirs / vllm_s:.1f}", f"{theirs / vllm_s / base:.2f}"],
            [f"vllm, generation only (warm; median of {args.repeats})", f"{warm_s:.2f}", warm_tokens,
             f"{warm_tokens / warm_s:.1f}", f"{warm_tokens / warm_s / base:.2f}"]]
    print(device_line(device, dtype))
    table(f"{len(samples)} questions, {len(chains)} chains, up to "
          f"{args.max_new_tokens} answer tokens; {same}/{len(samples)} answers equal across engines",
          ["engine", "s", "answer tokens", "tokens/s", "× torch"], rows)


if __name__ == "__main__":
    main()
