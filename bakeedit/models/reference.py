"""A model reference as a recipe (or a command line) gives it: ``ModelSpec``, and the checks it needs.

It lives in the models layer because the loader takes it; the recipe schema (``bakeedit/recipe.py``) embeds it as
``model:``. Devices are checked against this machine when the spec is read, so ``model.device: tpu`` or a CUDA
device the machine lacks fails before anything loads.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, StrictBool, field_validator

#: ``org/name``: what a recipe's relative ``model.id`` is taken for when no such path exists beside the recipe.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

DType = Literal["auto", "float32", "bfloat16", "float16"]


#: ``device_map`` values accelerate understands as strategies (``from_pretrained(device_map=...)``).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device(name: str) -> str:
    """``auto`` or a device torch can parse and this machine has: ``model.device: tpu`` or ``cuda`` on a machine
    without one fails when the recipe is read, not after the model was loaded on the CPU."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"'{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"'{name}' requested but this machine has no CUDA device; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"'{name}' requested but this machine has {count} CUDA device(s): cuda:0-cuda:{count - 1}")
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"'{name}' requested but MPS is not available on this machine; use auto or cpu")
        return name
    raise ValueError(f"'{name}': bakeedit runs models on cpu, cuda or mps, not {device.type}")


class ModelSpec(BaseModel):
    """Which model to load and how. ``id`` is a Hub id, a local folder, a ``.gguf`` file or ``embedded``.

    ``hub_only`` (set by :func:`load_recipe`, not part of the schema) says ``id`` was looked for beside the recipe,
    not found, and is therefore a Hub id: the loader must not try it as a folder relative to the working directory.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    revision: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: StrictBool = False
    #: The architecture table to use for a ``model_type`` that no architecture file names: a pattern
    #: (``llama-like``, ``phi-like``) or a family name. bakeedit offers the guess when the modules match.
    arch: str | None = None
    _hub_only: bool = PrivateAttr(default=False)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        return check_device(device)

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, device_map: str | None) -> str | None:
        """accelerate's placement strategies, or one device (everything on it)."""
        if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
            return device_map
        try:
            return check_device(device_map)
        except ValueError:
            raise ValueError(f"'{device_map}' is neither a placement strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) "
                             "nor a device (cpu, cuda:N, mps)") from None

    @property
    def hub_only(self) -> bool:
        return self._hub_only
