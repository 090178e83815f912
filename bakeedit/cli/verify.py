"""``bakeedit verify OUT``: re-check a folder against its manifest and its base model with the edit hooked in (a baked
checkpoint; a peft adapter or baked GGUF folder is verified again as ``bakeedit export`` verified it)."""

from __future__ import annotations

from pathlib import Path

import click

from bakeedit.cli.main import console
from bakeedit.errors import VerificationError
from bakeedit.export.artefacts import ADAPTER, CHECKPOINT, folder_kind
from bakeedit.workflows.apply import verify_output
from bakeedit.workflows.apply_low_memory import verify_output_blocks
from bakeedit.workflows.export import reverify


@click.command("verify")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--base", default=None, help="Base model reference, if it moved since apply (folder, Hub id...).")
@click.option("--tolerance", type=float, default=None, help="Override the dtype's default tolerance.")
@click.option("--blocks", is_flag=True,
              help="Never load a whole model: compare every tensor with the fold of the base's, and each edited block "
                   "with the base block running the edit through hooks (for models larger than memory).")
def verify_command(folder: Path, base: str | None, tolerance: float | None, blocks: bool) -> None:
    """Check every file and field against bakeedit.json, then compare the checkpoint's logits with the
    runtime-hooked base model.

    A file missing, changed or not listed, or a hand-edited bakeedit.json, is refused before any model is loaded.
    A peft adapter or baked GGUF folder (bakeedit export) is checked the same way, then verified again in a fresh
    process: the adapter on its base model, the GGUF file against the source file it was baked from.

    With --blocks the checkpoint is checked block by block instead (export/verify_blocks.py): memory for one block.
    """
    if folder_kind(folder) != CHECKPOINT:
        if blocks:
            raise click.UsageError("--blocks applies to a checkpoint folder; an adapter or GGUF folder is verified "
                                   "as bakeedit export verified it")
        if tolerance is not None:
            raise click.UsageError("--tolerance applies to a checkpoint folder; an adapter or GGUF folder keeps the "
                                   "bounds it was exported with")
        with console.status("verifying…"):
            again = reverify(folder, base=base)
        what = "adapter" if again.kind == ADAPTER else "GGUF"
        if not again.passed:
            raise VerificationError(f"{folder}: {what} verification failed: {'; '.join(again.failures)}",
                                    hint="export it again from its baked folder (bakeedit export FOLDER --to ...)")
        console.print(f"[green]verified[/]: every file matches bakeedit.json; {what}: {again.line}")
        return
    with console.status("verifying block by block…" if blocks else "verifying…"):
        check = verify_output_blocks if blocks else verify_output
        result = check(folder, base=base, tolerance=tolerance)
    what = f"{result.n_prompts} edited blocks, " if blocks else ""
    line = (
        f"max |delta {'output' if blocks else 'logit'}| {result.max_abs_logit_delta:.2e} (tolerance "
        f"{result.tolerance:.1e}, {result.dtype}, {what}{result.n_tokens} tokens); edit effect "
        f"{result.edit_effect or 0:.2e} (power: {result.power}); exact leg: {result.exact}"
        + (f" ({result.exact_tensors_compared} tensors)" if result.exact != "not run" else "")
        + (f", {len(result.exact_mismatched)} differ from the fold of the base, e.g. {result.exact_mismatched[0]}"
           if result.exact_mismatched else "")
        + "".join(f"; {note}" for note in result.notes if "fold differs" in note)
    )
    if not result.passed:
        raise VerificationError(
            f"{folder}: verification failed: {line}: the weights do not do what bakeedit.json's plan says",
            hint="the weights were changed after apply (even with their recorded hash): re-run bakeedit apply",
        )
    console.print(f"[green]verified[/]: every file matches bakeedit.json; {line}")
