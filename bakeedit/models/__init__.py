"""Models: loading (``load``), the architecture registry (``registry``, one data file per family under
``architectures/``), the site layout of one model (``arch``) and hook points (``hookpoints``, ``expert_hooks``)."""

from bakeedit.models.arch import SITES, ArchSpec, ModelLayout, supported_model_types
from bakeedit.models.load import LoadedModel, ModelSource, load_model, resolve_source

__all__ = ["SITES", "ArchSpec", "LoadedModel", "ModelLayout", "ModelSource", "load_model", "resolve_source",
           "supported_model_types"]
