"""``bakeedit push OUT REPO_ID``: check a baked, peft adapter or GGUF folder and publish it to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from bakeedit.cli.main import console
from bakeedit.export.card import CARD_FILE
from bakeedit.export.hub import UploadPlan, check_push, push_folder


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
@click.option("--dry-run", is_flag=True, help="Run every check of the push, list what it would upload; send nothing.")
def push_command(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
                 dry_run: bool) -> None:
    """Re-check FOLDER against bakeedit.json (every file, its digest, the plan), then create REPO_ID (if needed)
    and upload FOLDER in one commit that also deletes the branch's files FOLDER lacks.

    FOLDER is a baked checkpoint (bakeedit apply) or an adapter or GGUF folder (bakeedit export); each is pushed
    only if its recorded verification passed.

    The token comes from huggingface_hub's usual places (HF_TOKEN, or `hf auth login`); it is never printed.
    HF_ENDPOINT selects another Hub-compatible server. --dry-run runs every check the push runs before sending.
    """
    if dry_run:
        plan, notes = check_push(folder, repo_id)
        console.print(_plan_table(plan, repo_id, revision))
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        console.print("[green]checked[/]: verification passed, every file matches bakeedit.json, no pickle or "
                      "foreign code" + (", no file holds your token" if not any("logged in" in n for n in notes)
                                        else "") + "; the push would also delete the branch's files this folder "
                      "lacks; nothing was sent (dry run)", soft_wrap=True)
        return
    # Steps as plain lines, not a live spinner: huggingface_hub draws its own byte progress bars for the upload.
    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         report=lambda step: console.print(f"[dim]{step}…[/]"))
    console.print(f"[green]pushed[/] {len(result.plan.files)} files ({_size(result.plan.total_bytes)}) to "
                  f"{result.repo_id} ({result.revision}) at commit {result.commit_oid[:12]}; the Hub's tree at that "
                  f"commit matches the local files", soft_wrap=True)
    if result.stale:
        console.print(f"[yellow]warning:[/] the commit still holds {', '.join(result.stale)}, which this folder does "
                      "not have (the server ignored the deletions); delete them on the Hub", soft_wrap=True)
    click.echo(result.commit_url)
