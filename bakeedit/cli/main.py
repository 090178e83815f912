"""The Click group, error display and shared options."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click
from rich.console import Console

from bakeedit import __version__
from bakeedit.errors import BakeeditError

console = Console(stderr=True, highlight=False)


class BakeeditGroup(click.Group):
    """Turns :class:`BakeeditError` into one red line plus a hint and exit status 1 (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BakeeditError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            if exc.hint:
                console.print(f"[dim]hint: {exc.hint}[/]", soft_wrap=True)
            sys.exit(1)


@click.group(cls=BakeeditGroup)
@click.version_option(__version__, prog_name="bakeedit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Find the neurons of a causal LM that govern social bias, edit them, and bake the edit into a checkpoint."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    # transformers' own tqdm bars would interleave with ours; rich shows progress instead.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
