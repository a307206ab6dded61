"""Ask a running `mose serve` about an image with the `openai` client; print the answer and the skill
chain that explains it.

    mose serve --model runs/mose/refit --export runs/mose-export      # in another shell
    python examples/serve_client.py --image scene.png "What should the ego vehicle do?"
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from openai import OpenAI


def data_url(path: Path) -> str:
    """mose routes on the image itself, so it travels in the request as a data: URL."""
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--image", type=Path, help="the image the question is about")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="mose serve's /v1")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    content = [{"type": "image_url", "image_url": {"url": data_url(args.image)}}] if args.image else []
    content.append({"type": "text", "text": args.question})
    client = OpenAI(base_url=args.url, api_key="unused")  # mose serve asks for no key
    reply = client.chat.completions.create(model="mose", max_tokens=args.max_tokens, temperature=0,
                                           messages=[{"role": "user", "content": content}])
    print(reply.choices[0].message.content)
    chain = reply.model_extra["mose"]["skill_chain"]  # the extension field: an OpenAI client keeps it
    print(" → ".join(f"{level}: {c['skill']} ({c['prob']:.2f})" for level, c in chain.items()))
    print("adapter:", reply.model_extra["mose"]["adapter"])


if __name__ == "__main__":
    main()
