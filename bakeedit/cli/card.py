"""``bakeedit card OUT``: regenerate the model card (README.md) of a baked folder from its evidence."""

from __future__ import annotations

from pathlib import Path

import click

from bakeedit.cli.main import console
from bakeedit.export.card import write_card


@click.command("card")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--repo-id", default=None, help="Hub id the folder will be published under (fills the load snippet).")
def card_command(folder: Path, repo_id: str | None) -> None:
    """Rewrite FOLDER/README.md from bakeedit.json, eval/results.json and the files (atomic write).

    Every other file must still match bakeedit.json (the folder is refused, untouched, otherwise); the new card's
    and heat map's hashes are then recorded there, so `bakeedit verify` keeps passing.
    """
    path = write_card(folder, repo_id=repo_id)
    console.print(f"[green]card written[/]: {path}; bakeedit.json records its sha256")
    click.echo(str(path))
