"""peft adapters of a linear :class:`EditPlan`: IA3 and LoRA folders that ``PeftModel.from_pretrained`` loads.

Both reproduce the runtime edit (``edit/hooks.py``) exactly, with stock peft and no bakeedit at load time:

* **IA3** (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
  Learning", sec. 3.3: ``l ⊙ h``) multiplies the *output* of a target module, or its *input* when the module is
  one of ``feedforward_modules``. An output-channel site (``attn.q/k/v``, ``mlp.gate/up``, fused tensors included)
  is a vector over the module's whole output, 1 outside the edited channels; an input-channel site (``attn.o_in``,
  ``mlp.act``) is a feedforward vector over the input of ``o_proj``/``down_proj``. The bias is inside the scaled
  output, as in the hooks.
* **LoRA** (Hu et al. 2021, eq. 3: ``h = W0 x + B A x``). Scaling rows ``S`` of ``W`` by ``lambda`` is
  ``delta W = (lambda - 1) W[S, :]`` on those rows: ``A = W[S, :]``, ``B = one-hot(S) diag(lambda - 1)``, rank
  ``|S|``; scaling columns ``S`` is the transpose (``A = diag(lambda - 1) one-hot(S)^T``, ``B = W[:, S]``). Fused
  modules (Phi-3 ``qkv_proj``/``gate_up_proj``) take the physical rows of every edited site; GPT-2's Conv1D stores
  ``[in, out]``, so ``W`` is read transposed and ``fan_in_fan_out`` is set, as peft requires.

  Every module has the rank of the module with the most edited channels (zero rows pad the others) and
  ``lora_alpha = r``: the scale ``alpha / r`` is then 1 in peft, in vLLM (which reads one global ``r`` and
  ignores ``rank_pattern``) and in llama.cpp (``alpha`` over each tensor's own rank). A bias that must change (an
  edited output channel of Qwen2's q/k/v, of GPT-2's ``c_attn``/``c_fc``) is carried with peft's ``bias=
  "lora_only"``: the adapter stores the new bias of every targeted module that has one (peft's ``lora_bias=True``
  would add a bias to every target, and ``merge_and_unload`` then fails on the targets without one). Such an
  adapter loads and merges in peft only: vLLM dropped LoRA bias support (vllm-project/vllm#25807) and llama.cpp's
  ``convert_lora_to_gguf.py`` takes only ``lora_A``/``lora_B`` tensors. Only peft is exercised by the
  verification; ``AdapterSummary.servable_by`` names the other loaders the format is written for.

Only linear scales at all positions can be carried; a nonlinear map or a position-scoped edit needs the
custom-module checkpoint (``export/custom_module.py``). The folder is verified in a fresh process
(``export/verify_adapter.py``) before it is renamed into place (``io/staging.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bakeedit.edit.fold import feature_axis, scaled
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError, UnsupportedArchitecture, VerificationError
from bakeedit.export import adapter_record
from bakeedit.export.adapter_record import AdapterSummary, AdapterTarget, BaseModelInfo
from bakeedit.export.provenance import local_ref_for, relative_to_folder
from bakeedit.export.verify import probe_inputs
from bakeedit.export.verify_adapter import AdapterCheck, AdapterVerification, verify_adapter
from bakeedit.io.staging import staged_output
from bakeedit.models.arch import ModelLayout
from bakeedit.models.load import LoadedModel
from bakeedit.models.reference import HUB_ID
from bakeedit.neurons import NeuronSet

AdapterKind = Literal["ia3", "lora"]
KINDS: tuple[str, ...] = ("ia3", "lora")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (the tuner) .model (the transformers model)
CUSTOM_MODULE_HINT = ("bakeedit apply writes such a plan as a custom-module checkpoint "
                      "(trust_remote_code); an adapter carries linear scales at all positions only")


@dataclass
class AdapterWeights:
    """A built adapter, before anything is written: peft's config object and its tensors under peft's key names."""

    kind: str
    config: Any  # peft.IA3Config | peft.LoraConfig
    tensors: dict[str, torch.Tensor]
    summary: AdapterSummary


@dataclass(frozen=True)
class AdapterExport:
    """What :func:`export_adapter` wrote."""

    kind: str
    folder: Path
    files: tuple[str, ...]
    summary: AdapterSummary
    verification: AdapterVerification | None

    @property
    def targets(self) -> list[AdapterTarget]:
        return self.summary.targets


# ------------------------------------------------------------------------------------------------ planning


def _refuse_nonlinear(plan: EditPlan) -> None:
    if plan.module_groups:
        first = plan.module_groups[0]
        what = "a position-scoped scale" if first.map == "scale" else f"the nonlinear map {first.map}"
        where = "the last position" if first.positions == "last" else f"positions from token {first.start}"
        raise EditError(
            f"a peft adapter cannot carry this plan: {len(plan.module_groups)} group(s) are nonlinear or "
            f"position-scoped, e.g. layer {first.layer} {first.site} has {what} at {where}",
            hint=CUSTOM_MODULE_HINT,
        )


def adapter_targets(plan: EditPlan, model: nn.Module, layout: ModelLayout) -> list[AdapterTarget]:
    """The modules a linear ``plan`` touches, each with the physical channels it scales (fused layouts resolved by
    the layout, as for the fold); channels with lambda 1 are left out, and so is a module with no other.

    Refuses (:class:`EditError`, one line) a nonlinear or position-scoped plan, a routed expert (no module of its
    own for peft to wrap), and a module with both an output and an input site (no single IA3 vector or rank-|S|
    LoRA pair holds both)."""
    _refuse_nonlinear(plan)
    found: dict[str, dict[str, Any]] = {}
    for group in plan.groups:
        smap = layout.site_map(group.site)
        if smap.expert is not None or smap.param is not None:
            raise EditError(
                f"a peft adapter cannot carry layer {group.layer} {group.site}: a routed expert is a slice of one "
                "fused 3D parameter, not a module peft can wrap",
                hint="bake the edit into a checkpoint (bakeedit apply), or edit the shared expert or attention sites",
            )
        module = layout.module(model, group.layer, group.site)
        if (type(module).__name__ == "Conv1D") != layout.spec.transposed_weights:
            raise UnsupportedArchitecture(
                f"{layout.module_name(group.layer, group.site)} is a {type(module).__name__}, which the "
                f"{layout.spec.name} ArchSpec does not expect (transposed_weights={layout.spec.transposed_weights})"
            )
        name = layout.module_name(group.layer, group.site)
        mode = "output" if smap.axis == "out" else "input"
        entry = found.setdefault(name, {"mode": mode, "sites": [], "scales": {}, "has_bias": False,
                                        "width": module.weight.shape[feature_axis(layout, group.site)]})
        if entry["mode"] != mode:
            raise EditError(f"a peft adapter cannot scale both the output and the input of {name} "
                            f"({', '.join([*entry['sites'], group.site])})",
                            hint="bake the edit into a checkpoint (bakeedit apply) instead")
        entry["sites"].append(group.site)
        entry["has_bias"] = getattr(module, "bias", None) is not None
        channels = layout.channels(group.site, group.indices).tolist()
        for channel, lam in zip(channels, group.lambdas, strict=True):
            if lam != 1.0:
                entry["scales"][int(channel)] = float(lam)
    targets = []
    for name, entry in found.items():
        if not entry["scales"]:
            continue
        channels = sorted(entry["scales"])
        targets.append(AdapterTarget(module=name, mode=entry["mode"], sites=entry["sites"], width=entry["width"],
                                     channels=channels, lambdas=[entry["scales"][c] for c in channels],
                                     has_bias=entry["has_bias"]))
    if not targets:
        raise EditError("the plan changes no channel (every lambda is 1): there is no adapter to write",
                        hint="give the neurons a lambda other than 1")
    return targets


def _logical_weight(model: nn.Module, name: str, transposed: bool) -> torch.Tensor:
    """The module's weight as ``[out, in]`` in float32 (GPT-2's Conv1D stores ``[in, out]``)."""
    weight = model.get_submodule(name).weight.detach()
    return (weight.t() if transposed else weight).to(torch.float32, copy=True).cpu()


# ------------------------------------------------------------------------------------------------ building


def _peft_version() -> str:
    import peft  # peft imports transformers: only loaded when an adapter is built (start-up time of the CLI)

    return peft.__version__


def _sorted_names(config: Any, *fields: str) -> None:
    """peft keeps module names as sets, which ``save_pretrained`` writes in hash order: sorted lists make
    ``adapter_config.json`` the same bytes on every run (peft turns them back into sets on load)."""
    for name in fields:
        setattr(config, name, sorted(getattr(config, name)))


def build_ia3(plan: EditPlan, model: nn.Module, layout: ModelLayout, base_model_id: str | None = None,
              revision: str | None = None) -> AdapterWeights:
    """The IA3 adapter of ``plan``: output vectors ``[out, 1]`` on output-site modules, feedforward vectors
    ``[1, in]`` on input-site modules (``feedforward_modules``), lambda at the edited channels and 1 elsewhere."""
    from peft import IA3Config  # start-up time, as above

    targets = adapter_targets(plan, model, layout)
    tensors = {}
    for t in targets:
        vector = torch.ones(t.width, dtype=torch.float32)
        vector[torch.tensor(t.channels)] = torch.tensor(t.lambdas, dtype=torch.float32)
        tensors[f"{PREFIX}{t.module}.ia3_l"] = vector.view(-1, 1) if t.mode == "output" else vector.view(1, -1)
    transposed = layout.spec.transposed_weights
    config = IA3Config(
        task_type="CAUSAL_LM", base_model_name_or_path=base_model_id, revision=revision, inference_mode=True,
        target_modules=[t.module for t in targets],
        feedforward_modules=[t.module for t in targets if t.mode == "input"],
        fan_in_fan_out=transposed,
    )
    _sorted_names(config, "target_modules", "feedforward_modules")
    notes = []
    if any(t.bias_changes for t in targets):
        notes.append("IA3 scales a non-feedforward target's output, bias included, like the hooks; peft's merge "
                     "scales the bias too since peft 0.6 (huggingface/peft#972), earlier versions left it alone")
    summary = AdapterSummary(kind="ia3", peft_type="IA3", peft_version=_peft_version(), fan_in_fan_out=transposed,
                             targets=targets, servable_by=["peft"], notes=notes)
    return AdapterWeights("ia3", config, tensors, summary)


def build_lora(plan: EditPlan, model: nn.Module, layout: ModelLayout, base_model_id: str | None = None,
               revision: str | None = None) -> AdapterWeights:
    """The LoRA adapter of ``plan`` (module docstring): per module ``B A = (D - I) W`` (rows) or ``W (D - I)``
    (columns), padded with zeros to one rank ``r`` = the most edited channels of any module, ``lora_alpha = r``."""
    from peft import LoraConfig  # start-up time, as above

    targets = adapter_targets(plan, model, layout)
    rank = max(len(t.channels) for t in targets)
    transposed = layout.spec.transposed_weights
    carry_bias = any(t.bias_changes for t in targets)
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(targets):
        weight = _logical_weight(model, t.module, transposed)
        out_features, in_features = weight.shape
        a = torch.zeros(rank, in_features, dtype=torch.float32)
        b = torch.zeros(out_features, rank, dtype=torch.float32)
        slots = torch.arange(len(t.channels))
        channels = torch.tensor(t.channels)
        factors = torch.tensor(t.lambdas, dtype=torch.float32) - 1.0
        if t.mode == "output":
            a[slots] = weight[channels]
            b[channels, slots] = factors
        else:
            a[slots, channels] = factors
            b[:, slots] = weight[:, channels]
        tensors[f"{PREFIX}{t.module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{t.module}.lora_B.weight"] = b
        if carry_bias and t.has_bias:  # peft's bias="lora_only" saves the bias of every target that has one
            bias = model.get_submodule(t.module).bias.detach().cpu()
            if t.mode == "output":  # the fold's own arithmetic, so that the merged bias is the baked one
                full = torch.ones(t.width, dtype=torch.float32)
                full[channels] = torch.tensor(t.lambdas, dtype=torch.float32)
                bias = scaled(bias, 0, full)
            tensors[f"{PREFIX}{t.module}.base_layer.bias"] = bias.clone()
        targets[i] = t.model_copy(update={"rank": rank})
    config = LoraConfig(
        task_type="CAUSAL_LM", base_model_name_or_path=base_model_id, revision=revision, inference_mode=True,
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=[t.module for t in targets],
        fan_in_fan_out=transposed, bias="lora_only" if carry_bias else "none",
    )
    _sorted_names(config, "target_modules")
    notes = [f"rank {rank} in every module (the most edited channels of one module; fewer are zero-padded), "
             f"lora_alpha {rank}: the scale alpha/r is 1 for peft, vLLM and llama.cpp alike"]
    servable = ["peft"]
    if carry_bias:
        notes.append("edited output channels with a bias: the adapter carries the new biases (bias='lora_only'); "
                     "PeftModel.from_pretrained writes them into the base model, so disable_adapter() keeps them; "
                     "vLLM and llama.cpp's converter take no bias tensors")
    elif transposed:
        notes.append("Conv1D weights (fan_in_fan_out): peft's format; no other loader is known to take it")
    else:
        servable += ["vllm (multi-LoRA)", "llama.cpp (convert_lora_to_gguf.py)"]
    summary = AdapterSummary(kind="lora", peft_type="LORA", peft_version=_peft_version(), rank=rank,
                             lora_alpha=rank, bias=config.bias, fan_in_fan_out=transposed, targets=targets,
                             servable_by=servable, notes=notes)
    return AdapterWeights("lora", config, tensors, summary)


def build_adapter(kind: AdapterKind, plan: EditPlan, model: nn.Module, layout: ModelLayout,
                  base_model_id: str | None = None, revision: str | None = None) -> AdapterWeights:
    if kind not in KINDS:
        raise EditError(f"unknown adapter kind '{kind}'", hint=f"choose one of: {', '.join(KINDS)}")
    build = build_ia3 if kind == "ia3" else build_lora
    return build(plan, model, layout, base_model_id, revision)


def save_adapter_files(weights: AdapterWeights, folder: Path) -> list[str]:
    """Write ``adapter_config.json`` (peft's own ``save_pretrained`` of the config) and
    ``adapter_model.safetensors`` (peft's key names, ``{"format": "pt"}`` metadata as peft writes it)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights.config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in weights.tensors.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
    return [CONFIG_FILE, WEIGHTS_FILE]


# ------------------------------------------------------------------------------------------------ export


def write_adapter(
    kind: AdapterKind,
    plan: EditPlan,
    model: nn.Module,
    layout: ModelLayout,
    out: Path,
    *,
    base_folder: Path,
    base_model_id: str | None = None,
    base: BaseModelInfo | None = None,
    neurons: NeuronSet | None = None,
    baked_folder: Path | None = None,
    revision: str | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    verify: bool = True,
    overwrite: bool = False,
    protected: Sequence[Any] = (),
    timeout_s: float | None = None,
) -> AdapterExport:
    """Build the ``kind`` adapter of ``plan`` for ``model`` (the unedited base, loaded from ``base_folder``), write
    it to ``out`` through a staging folder, verify it in a fresh process (``verify``; a failure raises
    :class:`VerificationError` and leaves nothing), then write the card and ``bakeedit.json``.

    ``base_model_id`` goes into ``adapter_config.json`` (``base_model_name_or_path``) and the card's
    ``base_model``; ``baked_folder`` (a checkpoint of the same plan) is what ``merge_and_unload()`` must equal,
    else the base checkpoint with bakeedit's fold of the targeted tensors."""
    weights = build_adapter(kind, plan, model, layout, base_model_id, revision)  # refusals before any write
    info = base or BaseModelInfo(
        ref=base_model_id or Path(base_folder).name,
        kind="hub" if base_model_id and HUB_ID.match(base_model_id) else "local",
        hub_id=base_model_id if base_model_id and HUB_ID.match(base_model_id) else None, revision=revision)
    verification = None
    with staged_output(Path(out), overwrite, protected) as tmp:
        save_adapter_files(weights, tmp)
        if verify:
            verification = verify_adapter(AdapterCheck(
                adapter=tmp, base_folder=Path(base_folder), model=model, layout=layout, plan=plan, kind=kind,
                baked_folder=None if baked_folder is None else Path(baked_folder), inputs=inputs,
            ), timeout_s=timeout_s)
            if not verification.passed:
                raise VerificationError(f"the {kind} adapter does not reproduce the runtime edit: "
                                        f"{'; '.join(verification.failures())}",
                                        hint="nothing was written; please report this with the plan")
        adapter_record.write_card(tmp, weights.summary, plan, info, verification)
        adapter_record.write_record(tmp, adapter_record.AdapterRecord(
            adapter=weights.summary, base_model=info, neurons=neurons, plan=plan, verification=verification,
            baked_folder=None if baked_folder is None else relative_to_folder(os.path.abspath(baked_folder), out)))
        files = tuple(sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".")))
    return AdapterExport(kind, Path(out), files, weights.summary, verification)


def write_ia3_adapter(plan: EditPlan, model: nn.Module, layout: ModelLayout, out: Path, **kwargs) -> AdapterExport:
    """:func:`write_adapter` with ``kind="ia3"``."""
    return write_adapter("ia3", plan, model, layout, out, **kwargs)


def write_lora_adapter(plan: EditPlan, model: nn.Module, layout: ModelLayout, out: Path, **kwargs) -> AdapterExport:
    """:func:`write_adapter` with ``kind="lora"``."""
    return write_adapter("lora", plan, model, layout, out, **kwargs)


def export_adapter(kind: AdapterKind, plan: EditPlan, loaded: LoadedModel, out: Path,
                   base_ref: str | None = None, baked_folder: Path | None = None, **kwargs) -> AdapterExport:
    """The workflow entry point: :func:`write_adapter` for a :class:`LoadedModel` (its folder is the base the
    adapter is verified against; the probe uses its tokenizer). ``base_ref`` defaults to the source's Hub id."""
    source = loaded.source
    hub_id = source.base_model or (source.ref if source.kind == "hub" else None)
    base_ref = base_ref or hub_id
    info = BaseModelInfo(
        ref=local_ref_for(source.ref, source.kind, Path(out)), kind=source.kind, hub_id=hub_id,
        revision=source.revision, license=source.license, input_sha256=source.hash_inputs(), weights=source.weights)
    if "inputs" not in kwargs and loaded.tokenizer is not None:
        kwargs["inputs"] = probe_inputs(loaded.tokenizer, None, loaded.model.config)
    return write_adapter(kind, plan, loaded.model, loaded.layout, out, base_folder=source.path,
                         base_model_id=base_ref, base=info, baked_folder=baked_folder, revision=source.revision,
                         **kwargs)


__all__ = ["KINDS", "AdapterExport", "AdapterKind", "AdapterSummary", "AdapterTarget", "AdapterWeights",
           "adapter_targets", "build_adapter", "build_ia3", "build_lora", "export_adapter",
           "save_adapter_files", "write_adapter", "write_ia3_adapter", "write_lora_adapter"]
