"""The recipes mose ships (package data under `mose/recipes/`), found by name or copied out.

A `pip install mose` has no repository `configs/` folder, so the training recipes, studies
and accelerate configs travel inside the package, and every place that takes a recipe path
also takes a shipped name: `coda-lm/mose`, `demo`, `study/driving`, `accelerate/ddp`.
`_base.yaml` files are not runnable on their own: they are not listed, but a copy brings
along every base its recipe includes, so the copied files load without the package.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
KINDS = {"accelerate": "accelerate", "study": "study"}  # first folder → kind; else "train recipe"


def list_recipes() -> list[str]:
    """Every runnable shipped recipe's name (its path under the recipes folder, without .yaml)."""
    return sorted(_name(p) for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_"))


def recipe_kind(name: str) -> str:
    """What a shipped recipe is for: `train recipe` (mose train), `study` (mose study) or
    `accelerate` (accelerate launch --config_file)."""
    return KINDS.get(name.split("/", 1)[0], "train recipe")


def recipe_path(name_or_path: str | Path) -> Path:
    """An existing file as given (a path always wins), else the shipped recipe of that name.

    Raises ValueError naming close matches, so a typo is answered with what was meant.
    """
    given = Path(name_or_path)
    if given.is_file():
        return given
    shipped = _shipped(str(name_or_path))
    if shipped is not None:
        return shipped
    raise ValueError(f"{name_or_path}: no such file, nor a shipped recipe{_suggest(str(name_or_path))}")


def copy_recipe(name: str, dest_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy a shipped recipe with the bases it includes (or a folder of them, or `all`) to
    `dest_dir`, laid out as under their folder, so the copies load on their own from there.

    Refuses (FileExistsError) to replace any file unless `overwrite`: nothing is copied then.
    """
    anchor, files = _selection(name)
    dest_dir = Path(dest_dir)
    targets = {src: dest_dir / src.relative_to(anchor) for src in sorted(files)}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"will not overwrite {', '.join(existing)}: pass --overwrite "
                              "(overwrite=True) to replace them")
    for src, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return list(targets.values())


def leading_comment(path: Path) -> str:
    """The first line of a file's leading comment: what the recipe is, for `mose recipes list`."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return ""
        if line.strip("# "):
            return line.lstrip("#").strip()
    return ""


def _selection(name: str) -> tuple[Path, set[Path]]:
    """The folder the copies are laid out under, and the files: a folder's every YAML file, or
    one recipe and its chain of bases."""
    stripped = _strip(name)
    folder = (RECIPES / ("" if stripped == "all" else stripped)).resolve()
    if stripped and folder.is_dir() and folder.is_relative_to(RECIPES):
        return folder, set(folder.rglob("*.yaml"))
    path = _shipped(name)
    if path is None:
        raise ValueError(f"{name}: not a shipped recipe nor a folder of them{_suggest(name)}")
    return path.parent, _with_bases(path)


def _with_bases(path: Path) -> set[Path]:
    """The file and every `base:` it includes, recursively (relative to the including file)."""
    files = set()
    while path not in files:
        files.add(path)
        base = (yaml.safe_load(path.read_text()) or {}).get("base")
        if base is None:
            break
        path = (path.parent / base).resolve()
    return files


def _suggest(name: str) -> str:
    """`; did you mean ...` from names close to the whole name or to its last part."""
    names = list_recipes()
    query = _strip(name)
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
    tail = query.rsplit("/", 1)[-1]
    close += [n for n in names if n.rsplit("/", 1)[-1] == tail and n not in close]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{hint} (`mose recipes list` shows them all)"


def _shipped(name: str) -> Path | None:
    """The shipped file of that name (never one outside the recipes folder), or None."""
    path = (RECIPES / f"{_strip(name)}.yaml").resolve()
    return path if path.is_file() and path.is_relative_to(RECIPES) else None


def _strip(name: str) -> str:
    return name.strip("/").removesuffix(".yaml")


def _name(path: Path) -> str:
    return path.relative_to(RECIPES).with_suffix("").as_posix()
