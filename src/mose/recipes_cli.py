"""`mose recipes list|copy|path`: the shipped recipes, for an installed mose that has no `configs/`.

As torchtune's `tune ls` / `tune cp`: list what ships, then copy a recipe (with its bases) to
edit it. `mose train --config NAME` runs a shipped one as it is; `path` gives the file to tools
that only take paths (`accelerate launch --config_file $(mose recipes path accelerate/ddp)`).
A sub-app of its own, which `mose.cli` mounts with `app.add_typer(recipes_app, name="recipes")`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mose.train.shipped import copy_recipe, leading_comment, list_recipes, recipe_kind, recipe_path

recipes_app = typer.Typer(help="The shipped recipes, studies and accelerate configs: list, copy.",
                          no_args_is_help=True)
console = Console()


@recipes_app.command("list")
def list_command() -> None:
    """Every shipped recipe, by the name `--config` takes (mose train, mose study, mose estimate)."""
    table = Table("name", "kind", "what it is")
    for name in list_recipes():
        table.add_row(name, recipe_kind(name), leading_comment(recipe_path(name)))
    console.print(table)


@recipes_app.command("copy")
def copy_command(
    name: str = typer.Argument(..., help="a recipe (coda-lm/mose), a folder of them (coda-lm) or 'all'"),
    dest: Path = typer.Argument(..., help="folder to copy into (made if missing)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace files already there"),
) -> None:
    """Copy a shipped recipe and the bases it includes into DEST, to edit and run from there."""
    try:
        copied = copy_recipe(name, dest, overwrite=overwrite)
    except (ValueError, FileExistsError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    for path in copied:
        console.print(f"wrote {path}")


@recipes_app.command("path")
def path_command(name: str = typer.Argument(..., help="a shipped name (accelerate/ddp) or a file")) -> None:
    """Print a shipped recipe's file, for tools that take only paths (accelerate launch)."""
    try:
        print(recipe_path(name))
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
