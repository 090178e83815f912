"""Model loading and the architecture map (sites -> weights)."""

from bakeedit.models.arch import SITES, ArchSpec, ModelLayout, supported_model_types
from bakeedit.models.load import LoadedModel, ModelSource, load_model, resolve_source

__all__ = [
    "SITES",
    "ArchSpec",
    "LoadedModel",
    "ModelLayout",
    "ModelSource",
    "load_model",
    "resolve_source",
    "supported_model_types",
]
