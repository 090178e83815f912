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

computed in float32 with one parameter value per channel, at every real token whose index is at least ``start``
(``positions: all``) or only at the last real token of each sequence (``positions: last``; under ``generate()`` with
the KV cache, each row's last prompt token and then each new token). A token's index is its place among the real
tokens of its row (its position id, else counted from the attention mask, cached tokens included); a sequence ends
before padding, at the end of the row, or where the next position id does not follow on. To audit the edit:
``safe_open(path, "pt").metadata()["bakeedit"]`` is a JSON list of the groups, and the tensors ``{i}.channels`` and
``{i}.{parameter}`` hold each group's channels and parameter values.
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
        self.bakeedit_positions = frozenset(group["positions"] for group in self._bakeedit_meta["groups"])
        self._bakeedit_call = (0, None, None, {}, None)
        self._bakeedit_handles = [self.base_model.register_forward_pre_hook(self._read_call, with_kwargs=True)]
        for i, group in enumerate(self._bakeedit_meta["groups"]):
            edit = self._group_edit(i, group)
            module = self.get_submodule(group["module"])
            if group["axis"] == "out":
                handle = module.register_forward_hook(lambda _mod, _args, out, edit=edit: edit(out))
            else:
                handle = module.register_forward_pre_hook(lambda _mod, args, edit=edit: (edit(args[0]), *args[1:]))
            self._bakeedit_handles.append(handle)

    def _read_call(self, _module, args, kwargs):
        # Which tokens an edit reaches depends on the whole call: its cache length, attention mask and position ids.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        shape = tuple(tokens.shape[:2]) if torch.is_tensor(tokens) else None  # for [batch * seq, channels] sites
        self._bakeedit_call = (past, kwargs.get("attention_mask"), kwargs.get("position_ids"), {}, shape)

    def _positions(self, x):
        """Per token of this call: its index among its row's real tokens, and whether it is its sequence's last."""
        past, mask, pos, memo, shape = self._bakeedit_call
        flat = x.dim() == 2 and shape is not None and x.shape[0] == shape[0] * shape[1]
        batch, seq, device = *(shape if flat else x.shape[:2]), x.device
        if (batch, seq, device) not in memo:
            real = torch.ones(batch, seq, dtype=torch.bool, device=device)
            index = (past + torch.arange(seq, device=device)).expand(batch, seq)
            if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] in (seq, past + seq):  # not a 4D mask
                counted = mask.to(device=device, dtype=torch.long).expand(batch, -1)
                real = counted[:, -seq:].bool()
                index = counted.cumsum(1)[:, -seq:] - 1 + (past if counted.shape[1] == seq else 0)
            if torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[1] == seq and pos.shape[0] in (1, batch):
                index = pos.to(device=device, dtype=torch.long).expand(batch, seq)
            ends = torch.cat([~real[:, 1:] | (index[:, 1:] != index[:, :-1] + 1), torch.ones_like(real[:, :1])], 1)
            memo[(batch, seq, device)] = index, real & ends
        index, last = memo[(batch, seq, device)]
        return (index.reshape(-1), last.reshape(-1)) if flat else (index, last)

    def _group_edit(self, i, group):
        channels = self._bakeedit_tensors[f"{i}.channels"]
        params = {name: self._bakeedit_tensors[f"{i}.{name}"] for name in group["params"]}
        response = MAPS[group["map"]]
        on_device = {}  # the channels and parameters, copied once to each device the projection runs on

        def edit(x):
            index, last = self._positions(x)
            chosen = (index >= group["start"]) & (last | (group["positions"] == "all"))
            if not chosen.any():
                return x
            if x.device not in on_device:
                on_device[x.device] = channels.to(x.device), {k: v.to(x.device) for k, v in params.items()}
            idx, p = on_device[x.device]
            out = x.clone()
            out[..., idx] = torch.where(chosen[..., None], response(x[..., idx].float(), p).to(x.dtype), x[..., idx])
            return out

        return edit

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, plus the edit file, so that the saved folder loads with the same edit."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "_bakeedit_meta", None) is not None:
            metadata = {"bakeedit": json.dumps(self._bakeedit_meta)}
            save_file(self._bakeedit_tensors, os.path.join(save_directory, EDIT_FILE), metadata=metadata)
