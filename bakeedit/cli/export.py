"""``bakeedit export FOLDER --to gguf|ia3|lora -o OUT``: another artefact of a baked folder's edit."""

from __future__ import annotations

from pathlib import Path

import click

from bakeedit.cli.main import console
from bakeedit.cli.progress import command_progress
from bakeedit.workflows.export import EXPORT_KINDS, ExportResult, export_folder


def usage_lines(result: ExportResult) -> list[str]:
    """How to run what was written: llama.cpp / Ollama for a GGUF, peft for an adapter."""
    if result.kind == "gguf":
        return ["run it with:",
                f"  llama-cli -m {result.folder / (result.gguf_file or 'FILE.gguf')} -p 'The nurse said that'",
                f"  ollama create NAME -f {result.folder / 'Modelfile'} && ollama run NAME"]
    return ["load it with:",
            "  from peft import PeftModel",
            "  from transformers import AutoModelForCausalLM",
            f"  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({result.base or 'BASE'!r}), "
            f"{str(result.folder)!r})"]


WHAT = {"gguf": "baked GGUF", "ia3": "peft IA3 adapter", "lora": "peft LoRA adapter"}


def result_lines(result: ExportResult) -> list[str]:
    """What was written and its verification, as plain lines: a path is never cut short, as a table would."""
    status = "[green]passed[/]" if result.passed else "[red]FAILED[/]"
    return [f"[bold]{WHAT.get(result.kind, result.kind)}[/]: {result.folder} ({', '.join(result.files)})",
            f"  verification {status}: {result.line}"]


@click.command("export")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--to", "to", type=click.Choice(EXPORT_KINDS), required=True,
              help="gguf: the edit written into the base's own GGUF file (needs a GGUF base); ia3 / lora: a peft "
                   "adapter for the unmodified base.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a bakeedit output.")
@click.option("--base", default=None, help="Base model reference, if it moved since apply (folder, .gguf, Hub id).")
def export_command(folder: Path, to: str, out: Path, overwrite: bool, base: str | None) -> None:
    """Write FOLDER's edit (a bakeedit apply output) as another artefact, from its recorded plan and base model,
    and verify it in a fresh process before it is put in place.

    FOLDER is checked against its bakeedit.json and OUT against what it may replace before any model loads.
    """
    with command_progress() as (_progress, report):
        result = export_folder(folder, to, out, overwrite=overwrite, report=report, base=base)
    console.print("\n".join(result_lines(result)), highlight=False, soft_wrap=True)
    console.print("\n".join(usage_lines(result)), highlight=False, soft_wrap=True)
    click.echo(str(result.folder))
