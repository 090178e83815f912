"""Recognise a bakeedit custom-module checkpoint and read its base config without running its code.

A nonlinear or position-scoped edit is saved with a small ``modeling_bakeedit.py`` (``export/custom_module.py``
writes it) under its own ``model_type`` (``bakeedit_<base type>``), so plain transformers cannot load it unedited.
Loading, inspecting and laying out such a folder needs to know that, which is a models-layer question.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

MODEL_TYPE_PREFIX = "bakeedit_"
BASE_TYPE_KEY = "bakeedit_base_model_type"


def is_custom_module(folder: Path) -> bool:
    """Whether ``folder`` holds a bakeedit custom-module checkpoint (and so loads only with trust_remote_code)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    return str(json.loads(path.read_text()).get("model_type", "")).startswith(MODEL_TYPE_PREFIX)


def read_base_config(folder: Path):
    """The folder's config as its base architecture's config class, without running the custom code.

    For ``inspect`` and layouts: the module adds hooks, never parameters, so the base config describes the shapes.
    """
    if not is_custom_module(folder):
        return AutoConfig.from_pretrained(folder)
    data = json.loads((Path(folder) / "config.json").read_text())
    base_type = data.get(BASE_TYPE_KEY) or data["model_type"].removeprefix(MODEL_TYPE_PREFIX)
    for key in ("model_type", "auto_map", "architectures", BASE_TYPE_KEY):
        data.pop(key, None)
    return AutoConfig.for_model(base_type, **data)
