"""The model card (``README.md``) of a baked folder, built from what the folder holds.

Everything on the card is read from the folder: ``bakeedit.json`` (recipe, base model, neurons, plan, verification,
file hashes), ``eval/results.json`` (written by ``bakeedit eval``) and the files themselves. So the card can be
regenerated at any time (``bakeedit card OUT``) and says nothing the evidence beside it does not. ``README.md`` and
the heat map are hashed in ``bakeedit.json`` like every other file (a hand edit of the card is refused by verify and
push): :func:`write_card` first checks every other file of the folder, writes both atomically, then records their
new hashes (``provenance.refresh_manifest``), so regenerating the card keeps a valid folder valid.

The front matter is built with huggingface_hub's :class:`ModelCardData` and :class:`EvalResult` (never written by
hand), so the YAML is what the Hub parses: ``base_model`` with ``base_model_relation: finetune`` (the Hub's four
relations are adapter, merge, quantized and finetune; an edit that changes the full weights of one base model, with
no separate adapter file, is closest to a finetune; docs/publishing.md), ``library_name: transformers``, the base
model's license (``unknown`` when it could not be read), tags, and one ``model-index`` metric per task and metric
evaluated on the edited model. The body is rendered by :mod:`bakeedit.export.card_body`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bakeedit.errors import BakeeditError
from bakeedit.evaluate.report import read_results
from bakeedit.evaluate.tasks.base import UnknownTaskError, get_task
from bakeedit.export.card_body import render_body
from bakeedit.export.card_context import (
    BASE_MODEL_RELATION,
    CARD_FILE,
    CARD_OUTPUTS,
    EVAL_DIR,
    GENERATED_MARKER,
    HEATMAP_FILE,
    MITIGATION_TAG,
    TAGS,
    CardContext,
)
from bakeedit.export.heatmap import save_heatmap_png
from bakeedit.export.manifest import check_folder, refresh_manifest
from bakeedit.export.model_card import model_card
from bakeedit.export.provenance import Provenance, read_provenance
from bakeedit.io.hashing import file_sha256


def read_eval(folder: Path):
    """The folder's ``eval/results.json`` as an EvalRun, or None when no evaluation was written."""
    path = Path(folder) / EVAL_DIR
    if not (path / "results.json").is_file():
        return None

    return read_results(path)


def n_layers_of(folder: Path, provenance: Provenance) -> int:
    """Number of blocks from ``config.json`` (text config for multimodal ones); the deepest edited layer + 1 if the
    config names no layer count (read as JSON: a custom-module config has a model_type AutoConfig does not know)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config.get("text_config", config) or config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return 1 + max((n.layer for n in provenance.neurons.neurons), default=0)


def _folder_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def draw_heatmap(ctx: CardContext, path: Path | None = None) -> str | None:
    """Draw the neurons' layer x site heat map (PNG) at ``path`` (default: beside the card); returns the name the
    card links (``HEATMAP_FILE``), or None when there is nothing to draw."""
    neuron_set = ctx.provenance.neurons
    if not neuron_set.neurons or ctx.n_layers is None:
        return None
    try:
        save_heatmap_png(neuron_set, ctx.n_layers, None, path or ctx.folder / HEATMAP_FILE,
                         f"{neuron_set.method}: {len(neuron_set.neurons)} edited neurons per layer and site")
    except BakeeditError:
        return None  # a neuron outside the grid: the table still lists every neuron
    return HEATMAP_FILE


def card_context(folder: Path, repo_id: str | None = None, heatmap: bool = True,
                 local_name: str | None = None, heatmap_path: Path | None = None) -> CardContext:
    """Gather the evidence of ``folder``; draws the heat map PNG when ``heatmap`` is true (at ``heatmap_path``, a
    temporary file :func:`write_card` renames into place, else beside the card)."""
    folder = Path(folder)
    provenance = read_provenance(folder)
    ctx = CardContext(folder=folder, provenance=provenance, run=read_eval(folder), repo_id=repo_id,
                      local_name=local_name)
    ctx.n_layers = n_layers_of(folder, provenance)
    if heatmap:
        ctx.heatmap = draw_heatmap(ctx, heatmap_path)
    elif (folder / HEATMAP_FILE).is_file():
        ctx.heatmap = HEATMAP_FILE
    ctx.files = _folder_files(folder)
    drawn = heatmap_path if heatmap_path is not None else folder / HEATMAP_FILE
    if heatmap and ctx.heatmap and drawn.is_file():
        ctx.files[HEATMAP_FILE] = drawn.stat().st_size
        ctx.files = dict(sorted(ctx.files.items()))
        ctx.fresh_sha256[HEATMAP_FILE] = file_sha256(drawn)
    return ctx


def _hub_dataset(task: str) -> str:
    """The task's Hub dataset id when the task names one (the Hub links it), else the task's name."""
    try:
        return get_task(task).hf_dataset or task
    except UnknownTaskError:  # results of a task this version no longer has
        return task


def eval_results(ctx: CardContext) -> list:
    """One :class:`EvalResult` per task and metric of the edited model (finite values only: the Hub's YAML
    validation rejects NaN), grouped by the Hub into one model-index result per task."""
    from huggingface_hub import EvalResult

    label = ctx.edited_label
    if label is None:
        return []
    results = []
    for r in ctx.run.results[label]:
        for m in r.metrics.values():
            if m.value is None or not math.isfinite(m.value):
                continue
            results.append(EvalResult(
                task_type="text-generation",
                task_name=f"{r.kind} evaluation",
                dataset_type=_hub_dataset(r.task),
                dataset_name=r.task,
                metric_type=m.name,
                metric_name=f"{r.task} {m.name} (n={m.n})",
                metric_value=float(f"{m.value:.6g}"),
            ))
    return results


def card_data(ctx: CardContext):
    """The front matter as :class:`huggingface_hub.ModelCardData`."""
    from huggingface_hub import ModelCardData

    prov = ctx.provenance
    base = prov.base_model.hub_id
    results = eval_results(ctx)
    return ModelCardData(
        base_model=base,
        base_model_relation=BASE_MODEL_RELATION if base else None,
        library_name="transformers",
        license=prov.base_model.license or "unknown",
        pipeline_tag="text-generation",
        tags=[*TAGS, *([MITIGATION_TAG] if ctx.bias_reductions() else []), prov.neurons.method],
        model_name=ctx.model_name if results else None,
        eval_results=results or None,
    )


def build_card(folder: Path, repo_id: str | None = None, heatmap: bool = True, local_name: str | None = None,
               heatmap_path: Path | None = None):
    """The :class:`huggingface_hub.ModelCard` of ``folder`` (``repo_id`` fills the load snippet and model-index;
    ``local_name`` is the folder's final name when it is built in a staging folder; ``heatmap=False`` links the
    existing heat map without drawing: ``push --dry-run`` builds the card it would upload without writing)."""
    ctx = card_context(folder, repo_id=repo_id, heatmap=heatmap, local_name=local_name, heatmap_path=heatmap_path)
    return model_card(render_body(ctx), card_data(ctx))  # str(card) renders the front matter from card_data


def write_card(folder: Path, repo_id: str | None = None, local_name: str | None = None, *,
               check: bool = True) -> Path:
    """Regenerate ``folder/README.md`` and the heat map PNG, each atomically, and record their new hashes in
    ``bakeedit.json``; returns the card's path.

    With ``check`` (``bakeedit card``), every other file of the folder must first match the manifest: a folder
    that is not what was verified is refused (:class:`ManifestError`) and left untouched; ``bakeedit apply`` (which
    just wrote the folder) and ``bakeedit push`` (which just checked it) pass ``check=False``. Nothing is replaced
    when building the card fails. ``local_name`` is the output folder's final name, for the load snippet.
    """
    folder = Path(folder)
    if check:
        check_folder(folder, skip=CARD_OUTPUTS, purpose="refusing to write the card")
    path = folder / CARD_FILE
    card_tmp, heat_tmp = (folder / f".{name}.tmp-{os.getpid()}" for name in CARD_OUTPUTS)
    try:
        card = build_card(folder, repo_id=repo_id, local_name=local_name, heatmap_path=heat_tmp)
        card_tmp.write_text(str(card), encoding="utf-8")
        if heat_tmp.is_file():
            os.replace(heat_tmp, folder / HEATMAP_FILE)
        os.replace(card_tmp, path)
    finally:
        card_tmp.unlink(missing_ok=True)
        heat_tmp.unlink(missing_ok=True)
    refresh_manifest(folder, CARD_OUTPUTS, check=False)
    return path


def is_generated_card(path: Path) -> bool:
    """Whether ``path`` is a card bakeedit wrote (and may rewrite)."""
    try:
        return GENERATED_MARKER in Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
