"""A transformers causal LM with a neuron edit that cannot be folded into its weights, written by bakeedit.

Base class: LlamaForCausalLM (transformers).

The weights in this folder are the base model's, with any linear all-position part of the edit already folded in.
This file adds the rest and nothing else: ``from_pretrained`` reads the edit file ``bakeedit_edit.safetensors`` from
the same folder or Hub repository and hooks the projections it lists, so that the listed channels of their output
(``axis: out``) or input (``axis: in``) go through an elementwise map

    scale         lambda * a
    tanh_gain     a + alpha * tanh(a / s)
    sigmoid_gain  a * (1 + alpha * sigmoid(beta * (|a| - theta)))
    power         sign(a) * |a| ** p

computed in float32 with one parameter value per channel, at every position whose token index is at least
``start`` (``positions: all``) or only at the last position of each forward call (``positions: last``; under
``generate()`` with the KV cache, the last prompt token and then each new token). The token index counts cached
tokens. To audit the edit: ``safe_open(path, "pt").metadata()["bakeedit"]`` is a JSON list of the groups, and the
tensors ``{i}.channels`` and ``{i}.{parameter}`` hold each group's channels and parameter values.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import cached_file

EDIT_FILE = "bakeedit_edit.safetensors"
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
MAPS = {
    "scale": lambda a, p: a * p["lambda"],
    "tanh_gain": lambda a, p: a + p["alpha"] * torch.tanh(a / p["s"]),
    "sigmoid_gain": lambda a, p: a * (1 + p["alpha"] * torch.sigmoid(p["beta"] * (a.abs() - p["theta"]))),
    "power": lambda a, p: torch.sign(a) * a.abs().pow(p["p"]),
}


class BakeeditConfig(LlamaConfig):
    """The base config under a model_type of its own, so that plain transformers cannot load this folder unedited."""

    model_type = "bakeedit_llama"


class BakeeditForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM plus the edit in ``bakeedit_edit.safetensors``, applied by forward hooks."""

    config_class = BakeeditConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}
        model.load_bakeedit(cached_file(pretrained_model_name_or_path, EDIT_FILE, **hub))
        return model

    def load_bakeedit(self, path):
        """Read an edit file and hook its groups in, replacing any edit hooked before."""
        for handle in getattr(self, "_bakeedit_handles", []):
            handle.remove()
        with safe_open(path, framework="pt") as f:
            self._bakeedit_meta = json.loads(f.metadata()["bakeedit"])
            names = f.keys()
            self._bakeedit_tensors = {name: f.get_tensor(name) for name in names}
        self._bakeedit_offset = 0
        self._bakeedit_handles = [self.base_model.register_forward_pre_hook(self._count_cached, with_kwargs=True)]
        for i, group in enumerate(self._bakeedit_meta["groups"]):
            edit = self._group_edit(i, group)
            module = self.get_submodule(group["module"])
            if group["axis"] == "out":
                handle = module.register_forward_hook(lambda _mod, _args, out, edit=edit: edit(out))
            else:
                handle = module.register_forward_pre_hook(lambda _mod, args, edit=edit: (edit(args[0]), *args[1:]))
            self._bakeedit_handles.append(handle)

    def _count_cached(self, _module, _args, kwargs):
        # The token index of this call's first position is the number of tokens already in the cache.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._bakeedit_offset = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0

    def _group_edit(self, i, group):
        channels = self._bakeedit_tensors[f"{i}.channels"]
        params = {name: self._bakeedit_tensors[f"{i}.{name}"] for name in group["params"]}
        response = MAPS[group["map"]]
        on_device = {}  # the channels and parameters, copied once to each device the projection runs on

        def edit(x):
            seq = x.shape[-2]
            first = seq - 1 if group["positions"] == "last" else 0
            first = min(seq, max(first, group["start"] - self._bakeedit_offset))
            if first == seq:
                return x
            if x.device not in on_device:
                on_device[x.device] = channels.to(x.device), {k: v.to(x.device) for k, v in params.items()}
            idx, p = on_device[x.device]
            out = x.clone()
            out[..., first:, idx] = response(x[..., first:, idx].float(), p).to(x.dtype)
            return out

        return edit

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus the edit file, so that the saved folder loads with the same edit."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "_bakeedit_meta", None) is not None:
            metadata = {"bakeedit": json.dumps(self._bakeedit_meta)}
            save_file(self._bakeedit_tensors, os.path.join(save_directory, EDIT_FILE), metadata=metadata)
