"""`mose ...`: a thin command line over the library."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.tree import Tree

app = typer.Typer(help="Skill-by-skill Mixture-of-Experts for vision-language models.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.command()
def taxonomy(name: str = typer.Argument("driving", help="built-in name or YAML path")) -> None:
    """Show a skill taxonomy: its levels, in order, and their skills."""
    from mose.skills.taxonomy import load_taxonomy

    try:
        loaded = load_taxonomy(name)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    tree = Tree(f"[bold]{loaded.name}[/bold]")
    for level in loaded.levels:
        branch = tree.add(f"[cyan]{level.name}[/cyan]")
        for skill, description in zip(level.skills, level.descriptions, strict=True):
            branch.add(f"{skill}: {description}" if description else skill)
    console.print(tree)


@app.command()
def version() -> None:
    """Print mose's version."""
    from mose import __version__

    console.print(__version__)
