"""The README's Python example runs as written (its ```python blocks; a ```py block needs a running
server, e.g. the `mose serve` client, which tests/engine/test_serve.py runs for real)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)  # it writes runs/readme-model
    namespace = {"__name__": "readme"}  # the blocks continue one another, like a tutorial
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["out"].router_loss is not None  # the batch carried skill labels
    assert (tmp_path / "runs" / "readme-model" / "model.safetensors").is_file()
