"""One pass vs chain: a planning answer in one forward pass vs the three-round dialogue.

The chain asks perception, then prediction, then planning, feeding each round's
answer back as context, as multi-round VLM pipelines do; the one-pass model
answers the planning question directly (MoSE's skill chain is its explanation).
Same converted tiny Qwen2-VL, greedy decoding, fixed answer lengths.
"""

from __future__ import annotations

import torch
from common import device_line, medians, parser, setup, table
from PIL import Image

import mose

ROUNDS = [
    "What objects are in the scene and where are they?",
    "How will each of these objects move next?",
    "What should the ego vehicle do now?",
]


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    device, dtype = setup(args)
    answer_tokens = 8 if args.quick else 24
    model, processor = mose.tiny_model("qwen2_vl", seed=0, hidden_size=256, num_attention_heads=8,
                                       num_key_value_heads=4, intermediate_size=1536)
    model = mose.convert(model, mose.MoSEConfig()).to(device, dtype).eval()
    image = Image.new("RGB", (224, 224), "gray")
    print(f"# One pass vs chain — tiny Qwen2-VL (hidden 256), image 224×224, {answer_tokens} "
          f"answer tokens per round; {device_line(device, dtype)}")

    def answer(messages):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=answer_tokens,
                             min_new_tokens=answer_tokens, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                          skip_special_tokens=True)

    def user(text, with_image=False):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return {"role": "user", "content": content}

    def one_pass():
        return answer([user(ROUNDS[-1], with_image=True)])

    def chain():
        messages = []
        for i, question in enumerate(ROUNDS):
            messages.append(user(question, with_image=i == 0))
            messages.append({"role": "assistant", "content": answer(messages)})
        return messages[-1]["content"]

    with torch.no_grad():
        times = medians({"one pass": one_pass, "three-round chain": chain}, device,
                        max(3, args.repeats // 2), args.warmup)
    rows = [[name, f"{times[name] * 1e3:.1f}", times[name] / times["one pass"]] for name in times]
    table("planning answer latency", ["method", "ms", "× one pass"], rows)
    print(f"\none pass is {times['three-round chain'] / times['one pass']:.2f}× faster "
          "(target ≥ 2×)")


if __name__ == "__main__":
    main()
