"""What backward's recomputation of a checkpointed block must see: the block as its forward saw it.

``torch.utils.checkpoint`` (non-reentrant) re-runs a block's forward during backward to rebuild the tensors it did
not keep. That re-run happens *after* the forward returned: a method may have removed its hooks by then
(KnowBias' IG takes its gradient after leaving ``site_hooks``), an expert-site hook may have restored the experts
module's own ``forward`` (``models/expert_hooks.py``), and the block's KV-cache layer already holds the keys and
values the forward appended. :class:`ForwardState` records, when the forward starts, every submodule's instance
attributes (hook dicts, a patched ``forward``, the expert-hook table) and each KV cache's contents, and puts them
back for the duration of a re-run; afterwards the current objects return, so hook handles removed later still find
their dicts. Used by :mod:`bakeedit.models.lazy`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

#: Instance attributes of a module that the recomputation must not roll back (the lazy unit loads parameters
#: itself; submodules are the same objects).
_KEPT = frozenset({"_parameters", "_buffers", "_modules"})


def _copy_value(value: Any) -> Any:
    """One level of a module attribute: hook dicts (and the expert-hook table's lists) are copied, since removing a
    hook mutates them; tensors and other objects are kept by reference."""
    if isinstance(value, dict):
        out = copy.copy(value)
        for k, v in value.items():
            if isinstance(v, list):
                out[k] = list(v)
        return out
    return value


def _is_cache(value: Any) -> bool:
    return isinstance(getattr(value, "layers", None), list) and callable(getattr(value, "update", None))


def _cache_state(cache: Any) -> tuple[dict, list, list[dict]]:
    return dict(vars(cache)), list(cache.layers), [dict(vars(layer)) for layer in cache.layers]


def _set_cache_state(cache: Any, state: tuple[dict, list, list[dict]]) -> None:
    attrs, layers, layer_attrs = state
    vars(cache).clear()
    vars(cache).update(attrs)
    cache.layers[:] = layers
    for layer, saved in zip(layers, layer_attrs, strict=True):
        vars(layer).clear()
        vars(layer).update(saved)


class ForwardState:
    """The submodules' attributes (hooks, patched ``forward``) and the KV caches' contents as a unit's forward
    found them, so that backward's recomputation of the unit computes what the forward computed."""

    def __init__(self, module: nn.Module, args: Iterable[Any]) -> None:
        self.modules = [(m, {k: _copy_value(v) for k, v in vars(m).items() if k not in _KEPT})
                        for m in module.modules()]
        self.caches = [(c, _cache_state(c)) for c in args if _is_cache(c)]

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        now_modules = [(m, {k: v for k, v in vars(m).items() if k not in _KEPT}) for m, _ in self.modules]
        now_caches = [(c, _cache_state(c)) for c, _ in self.caches]
        for m, saved in self.modules:
            self._set(m, {k: _copy_value(v) for k, v in saved.items()})
        for c, saved_cache in self.caches:
            _set_cache_state(c, saved_cache)
        try:
            yield
        finally:
            for m, now in now_modules:
                self._set(m, now)  # the very objects: hook handles removed later must find their dicts
            for c, now_cache in now_caches:
                _set_cache_state(c, now_cache)

    @staticmethod
    def _set(module: nn.Module, attrs: dict[str, Any]) -> None:
        d = vars(module)
        for k in [k for k in d if k not in _KEPT and k not in attrs]:
            del d[k]
        d.update(attrs)
