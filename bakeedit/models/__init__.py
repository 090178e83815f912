"""Model loading and the architecture map (sites -> weights).

The names are imported lazily (PEP 562): ``bakeedit.recipe`` needs ``bakeedit.models.arch``, while
``bakeedit.models.load`` needs ``bakeedit.recipe``; eager imports here would make that a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SITES": "bakeedit.models.arch",
    "ArchSpec": "bakeedit.models.arch",
    "ModelLayout": "bakeedit.models.arch",
    "supported_model_types": "bakeedit.models.arch",
    "LoadedModel": "bakeedit.models.load",
    "ModelSource": "bakeedit.models.load",
    "load_model": "bakeedit.models.load",
    "resolve_source": "bakeedit.models.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bakeedit.models' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
