"""Save the part of an edit that cannot be folded as transformers custom code: one short module and one tensor file.

An edit with nonlinear maps or position scopes (``bakeedit/edit/nonlinear.py``) is saved the way transformers
documents custom models (``auto_map`` in ``config.json`` + a ``modeling_*.py`` beside it, loaded with
``trust_remote_code=True``, offline or from the Hub):

* the weights are the base model's with only the linear all-position part of the plan folded in;
* ``modeling_bakeedit.py`` is ``modeling_template.py`` with the base classes filled in: a subclass of the base model
  class whose ``from_pretrained`` hooks the listed projections. It imports only torch, safetensors and transformers,
  so a user can read all of it before trusting it; its sha256 goes into ``bakeedit.json`` and the model card;
* ``bakeedit_edit.safetensors`` holds each group's physical channels and parameter vectors, with the group list
  (module path, axis, map, positions, start) as JSON in the safetensors metadata. It is a file of the checkpoint, not
  a buffer built in ``__init__`` (those come back uninitialised from ``from_pretrained``; ENVIRONMENT.md);
* ``config.json`` gets a model_type of its own (``bakeedit_<base>``), ``architectures`` and ``auto_map``, so that
  transformers without ``trust_remote_code=True`` refuses the folder with its own message instead of silently
  loading the unedited base model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError
from bakeedit.export.provenance import CustomModuleInfo
from bakeedit.io.hashing import file_sha256
from bakeedit.models.arch import ModelLayout
from bakeedit.models.custom import BASE_TYPE_KEY, MODEL_TYPE_PREFIX

MODULE_FILE = "modeling_bakeedit.py"
EDIT_FILE = "bakeedit_edit.safetensors"
TEMPLATE = Path(__file__).with_name("modeling_template.py")
CONFIG_CLASS = "BakeeditConfig"
MODEL_CLASS = "BakeeditForCausalLM"
MAX_MODULE_LINES = 150
EDIT_FORMAT = 1

_TEMPLATE_CONFIG, _TEMPLATE_MODEL, _TEMPLATE_TYPE = "LlamaConfig", "LlamaForCausalLM", "bakeedit_llama"
_TEMPLATE_IMPORT = f"from transformers import {_TEMPLATE_CONFIG}, {_TEMPLATE_MODEL}\n"


def render_module(model_class: str, config_class: str, base_model_type: str) -> str:
    """The module's source for one base architecture (the template with its three names replaced)."""
    import transformers

    for name in (model_class, config_class):
        if not hasattr(transformers, name):
            raise EditError(
                f"cannot write a custom module for {model_class}: transformers does not export '{name}'",
                hint="nonlinear and position-scoped edits need a model class importable from transformers",
            )
    text = TEMPLATE.read_text()
    if text.count(_TEMPLATE_IMPORT) != 1:
        raise EditError(f"{TEMPLATE}: the template's import line has changed; cannot fill it in")
    names = ", ".join(sorted({config_class, model_class}))
    text = text.replace(_TEMPLATE_IMPORT, f"from transformers import {names}\n")
    text = re.sub(rf"\b{_TEMPLATE_MODEL}\b", model_class, text)
    text = re.sub(rf"\b{_TEMPLATE_CONFIG}\b", config_class, text)
    return text.replace(f'"{_TEMPLATE_TYPE}"', f'"{MODEL_TYPE_PREFIX}{base_model_type}"')


def edit_tensors(plan: EditPlan, layout: ModelLayout) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the group list (metadata) of ``EDIT_FILE`` for the plan's module groups.

    Group ``i`` stores ``{i}.channels`` (int64 ``[n]``: physical channels of the module's output or input feature
    axis, which differ from the site indices in fused layouts) and ``{i}.{param}`` (float32 ``[n]``).
    """
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for i, group in enumerate(plan.module_groups):
        tensors[f"{i}.channels"] = layout.channels(group.site, group.indices).clone().to(torch.int64)
        for name, values in group.params.items():
            tensors[f"{i}.{name}"] = torch.tensor(values, dtype=torch.float32)
        groups.append({
            "layer": group.layer, "site": group.site, "module": layout.module_name(group.layer, group.site),
            "axis": layout.site_map(group.site).axis, "map": group.map, "positions": group.positions,
            "start": group.start, "params": list(group.params),
        })
    return tensors, {"format": EDIT_FORMAT, "groups": groups}


def _rewrite_config(folder: Path, base_model_type: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update({
        "model_type": MODEL_TYPE_PREFIX + base_model_type,
        BASE_TYPE_KEY: base_model_type,
        "architectures": [MODEL_CLASS],
        "auto_map": {
            "AutoConfig": f"{Path(MODULE_FILE).stem}.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{Path(MODULE_FILE).stem}.{MODEL_CLASS}",
        },
    })
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_module_supported(layout: ModelLayout, plan: EditPlan) -> None:
    """Refuse, before any work, a plan whose nonlinear or position-scoped part would need a custom module that
    cannot load: a mixture-of-experts family stores its experts per expert on disk, and transformers fuses them on
    load only for its own ``model_type`` (its weight conversion is keyed by it), so under ``bakeedit_<type>`` the
    experts would load uninitialised."""
    if plan.module_groups and layout.spec.expert_sites:
        raise EditError(
            f"nonlinear or position-scoped edits of a {layout.spec.name} model (mixture of experts) cannot be saved "
            "as a custom module: transformers would not load its experts under the module's own model_type",
            hint="use linear all-position edits (they are folded into the weights), or leave positions: all",
        )


def write_custom_module(folder: Path, model: nn.Module, layout: ModelLayout, plan: EditPlan) -> CustomModuleInfo:
    """Add the module, the edit file and the config entries to a checkpoint already saved in ``folder``."""
    if not plan.module_groups:
        raise EditError("the plan has no nonlinear or position-scoped part; a plain folded checkpoint needs no module")
    check_module_supported(layout, plan)
    folder = Path(folder)
    base_type = layout.model_type
    if base_type.startswith(MODEL_TYPE_PREFIX):
        raise EditError(
            f"the model is already a bakeedit custom-module checkpoint ({base_type})",
            hint="edit the base model with both edits in one recipe instead of editing an edited checkpoint",
        )
    source = render_module(type(model).__name__, type(model.config).__name__, base_type)
    n_lines = len(source.splitlines())
    if n_lines >= MAX_MODULE_LINES:
        raise EditError(f"the generated {MODULE_FILE} has {n_lines} lines; users are asked to read it (< 150)")
    (folder / MODULE_FILE).write_text(source)
    tensors, meta = edit_tensors(plan, layout)
    save_file(tensors, str(folder / EDIT_FILE), metadata={"bakeedit": json.dumps(meta)})
    _rewrite_config(folder, base_type)
    return CustomModuleInfo(
        module_file=MODULE_FILE, module_sha256=file_sha256(folder / MODULE_FILE), module_lines=n_lines,
        edit_file=EDIT_FILE, edit_sha256=file_sha256(folder / EDIT_FILE), model_type=MODEL_TYPE_PREFIX + base_type,
        base_model_type=base_type, base_class=type(model).__name__, n_groups=len(plan.module_groups),
    )
