"""``edit.fit`` once per model, neurons, edit and data: the fitted parameters kept in bakeedit's cache.

A fit (``bakeedit/edit/fit.py``) runs every grid point over the locate split: 7-15 minutes on Gemma-3-270M on a
2-core CPU. ``bakeedit search`` fitted again for every trial, again when it re-planned the front, and ``apply`` again
for the chosen recipe, though the same neurons, edit and data give the same choice. The report is stored as JSON
under ``$BAKEEDIT_CACHE/fit/<key>.json``, keyed by everything the fit reads: the model (reference, revision, or
the sha256 of its files; dtype and device type), the neurons, the edit as written (map, its grid, budget, split,
categories, item count) and the sha256 of the contrast file. A cached report says so (``cached: true`` in
``bakeedit.json``'s ``fit``) and keeps the seconds of the fit that made it. An entry that cannot be read is
reported, deleted and fitted again: a cache is a shortcut and never fails a run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bakeedit.data import package_data_path
from bakeedit.data.contrast import CONTRAST_FILE
from bakeedit.edit.fit import FitReport, fit_edit, with_params
from bakeedit.io.hashing import file_sha256
from bakeedit.locate.cache import cache_key
from bakeedit.models.load import LoadedModel
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

log = logging.getLogger(__name__)
#: Bumped when the fit's objective or grid walk changes what it would choose.
FIT_CACHE_VERSION = 1


def fit_parts(edit: EditSpec, neurons: list[Neuron], loaded: LoadedModel, data: Path | None) -> dict[str, Any]:
    """Everything a fit's choice depends on (the cache key's parts)."""
    source = loaded.source
    model: dict[str, Any] = {"ref": source.ref, "revision": source.revision, "dtype": str(loaded.dtype),
                             "device": loaded.device.type}
    if source.revision is None:
        model["files"] = source.hash_inputs()
    contrast = Path(data) if data is not None else package_data_path(CONTRAST_FILE)
    written = edit.model_dump(mode="json", by_alias=True, exclude_none=True)
    # the contrast file counts by its content: the chosen recipe of a search spells its path from another folder
    (written.get("fit") or {}).pop("data", None)
    return {
        "version": FIT_CACHE_VERSION,
        "model": model,
        "neurons": sorted(json.dumps(n.model_dump(mode="json", by_alias=True, exclude={"score"}), sort_keys=True)
                          for n in neurons),
        "edit": written,
        "data": file_sha256(contrast),
    }


def cached_fit_edit(
    edit: EditSpec, neurons: list[Neuron], loaded: LoadedModel, data: Path | None, cache_dir: Path | None
) -> tuple[EditSpec, FitReport]:
    """:func:`bakeedit.edit.fit.fit_edit`, read from ``cache_dir`` when the same fit ran before (``None``: no cache)."""
    if cache_dir is None:
        return fit_edit(edit, neurons, loaded, data)
    path = Path(cache_dir) / f"{cache_key(fit_parts(edit, neurons, loaded, data))}.json"
    if path.exists():
        try:
            report = FitReport.model_validate_json(path.read_text())
            return with_params(edit, report.chosen), report.model_copy(update={"cached": True})
        except (OSError, ValueError, ValidationError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("warning: fit cache entry %s is damaged (%s); discarded, fitting again", path, why)
            path.unlink(missing_ok=True)
    fitted, report = fit_edit(edit, neurons, loaded, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report.model_dump(mode="json"), indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return fitted, report
