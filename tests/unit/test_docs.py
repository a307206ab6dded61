"""The documentation site: the generated reference pages match the code, and the site builds.

After changing a CLI option or a recipe/study key, regenerate the pages:
`.venv/bin/python docs/gen_reference.py`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_is_current(tmp_path: Path) -> None:
    generator = _generator()
    for written in generator.write(tmp_path):
        committed = DOCS / "reference" / written.name
        assert committed.is_file(), f"{committed} is missing: run .venv/bin/python docs/gen_reference.py"
        assert committed.read_text() == written.read_text(), (
            f"{committed.relative_to(ROOT)} is stale: run .venv/bin/python docs/gen_reference.py")


def test_reference_covers_every_command_and_key(tmp_path: Path) -> None:
    import dataclasses

    from mose.train.recipe import Recipe, RouterStage

    generator = _generator()
    cli, recipe = generator.cli_page(), generator.recipe_page()
    for command in ("mose train", "mose predict", "mose world generate", "mose data convert"):
        assert f"`{command}`" in cli
    for f in [*dataclasses.fields(Recipe), *dataclasses.fields(RouterStage)]:
        if f.name != "source":
            assert f"`{f.name}`" in recipe


def test_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings are not installed: pip install -e '.[docs]' (make docs)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
