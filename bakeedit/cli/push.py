"""``bakeedit push OUT REPO_ID``: check a baked folder and publish it to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from bakeedit.cli.main import console
from bakeedit.export.card import CARD_FILE
from bakeedit.export.hub import UploadPlan, plan_push, push_folder


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _plan_table(plan: UploadPlan, repo_id: str, revision: str | None) -> Table:
    table = Table(title=f"would upload to {repo_id} ({revision or 'main'})", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for f in plan.files:
        note = " (regenerated with the repo id at push)" if f.path == CARD_FILE and plan.regenerate_card else ""
        table.add_row(f.path + note, _size(f.size))
    table.add_section()
    table.add_row(f"{len(plan.files)} files", _size(plan.total_bytes))
    return table


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its setting).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing) [default: main].")
@click.option("--commit-message", default=None, help="Commit summary [default: recipe name, method, neurons].")
@click.option("--dry-run", is_flag=True, help="Check the folder and list what would be uploaded; send nothing.")
def push_command(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
                 dry_run: bool) -> None:
    """Re-check FOLDER's file hashes against bakeedit.json, then create REPO_ID (if needed) and upload FOLDER.

    The token comes from huggingface_hub's usual places (HF_TOKEN, or `hf auth login`); it is never printed.
    HF_ENDPOINT selects another Hub-compatible server.
    """
    if dry_run:
        plan = plan_push(folder)
        console.print(_plan_table(plan, repo_id, revision))
        console.print("[green]checked[/]: verification passed and every recorded file matches its sha256; "
                      "nothing was sent (dry run)", soft_wrap=True)
        return
    # Steps as plain lines, not a live spinner: huggingface_hub draws its own byte progress bars for the upload.
    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         report=lambda step: console.print(f"[dim]{step}…[/]"))
    console.print(f"[green]pushed[/] {len(result.plan.files)} files ({_size(result.plan.total_bytes)}) to "
                  f"{result.repo_id} ({result.revision}) at commit {result.commit_oid[:12]}; the Hub's tree at that "
                  f"commit matches the local files", soft_wrap=True)
    if result.stale:
        console.print(f"[yellow]warning:[/] the repository also holds {', '.join(result.stale)} from an earlier push, "
                      "which this folder does not have; delete them on the Hub or push to a new repository or branch",
                      soft_wrap=True)
    click.echo(result.commit_url)
