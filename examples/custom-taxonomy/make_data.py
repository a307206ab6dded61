"""A small dataset in mose's sample format: warehouse scenes (a box on a shelf, sometimes a
person in the aisle) and three kinds of question about them. Your own data would come from
your own files; what matters is the record format (README: "Sample record")."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mose.data import Sample, write_jsonl

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200)}
SIZE = 56  # 56 x 56 pixels: 4 image tokens on the tiny Qwen2-VL


def scene(colour: str, person: bool, side: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (235, 230, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 20, SIZE, 23], fill=(120, 90, 60))  # the shelf
    x = 6 if side == "left" else 34
    draw.rectangle([x, 6, x + 14, 19], fill=COLOURS[colour])  # the box on it
    if person:
        draw.ellipse([24, 30, 32, 38], fill=(240, 180, 120))  # head
        draw.rectangle([23, 38, 33, 54], fill=(70, 70, 70))  # body
    return image


def records(n: int, split: str, folder: Path, seed: int) -> list[Sample]:
    rng = random.Random(f"{seed}-{split}")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        colour, person, side = rng.choice(list(COLOURS)), rng.random() < 0.5, rng.choice(["left", "right"])
        path = folder / "images" / f"{split}_{i:04d}.png"
        scene(colour, person, side).save(path)
        kind = i % 3
        question, answer = [
            ("What is the colour of the box on the shelf?", colour),
            ("Is there a person in the aisle?", "yes" if person else "no"),
            ("Should the robot pick the box or wait?", "wait" if person else "pick"),
        ][kind]
        out.append(Sample(id=f"warehouse/{split}/{i}", images=[str(path)], question=question, answer=answer,
                          task=["colour", "person", "decision"][kind], meta={"side": side}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--n", type=int, default=600, help="training records")
    parser.add_argument("--test", type=int, default=90, help="test records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, n in (("train", args.n), ("test", args.test)):
        count = write_jsonl(args.out / f"{split}.jsonl", records(n, split, args.out, args.seed))
        print(f"wrote {count} records to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
