"""Resolve a model reference to a local checkpoint folder and load it with its tokenizer and layout.

A reference is the embedded default (``embedded``), a ``.gguf`` file (converted once to a safetensors cache), a
local folder, or a Hub id (resolved with ``snapshot_download``, so the exact commit is known and recorded).

Every way a model folder can be damaged (a malformed ``config.json``, a truncated or corrupt ``.safetensors`` shard,
an unreadable tokenizer) is reported as one :class:`ModelLoadError` naming the file, never as the parser's own
exception: the user can act on "this file is damaged", not on a Rust deserialiser's message.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bakeedit.errors import BakeeditError, ModelLoadError, UnsupportedArchitecture
from bakeedit.io.hashing import file_sha256
from bakeedit.io.shards import FLOAT_DTYPES, read_shard
from bakeedit.models.arch import ModelLayout, spec_for_model_type
from bakeedit.models.custom import is_custom_module, read_base_config
from bakeedit.models.embedded import (
    EMBEDDED_ALIASES,
    EMBEDDED_BASE_MODEL,
    EMBEDDED_LICENSE,
    embedded_gguf_path,
    gguf_to_safetensors,
    gguf_weights_note,
)
from bakeedit.models.lazy import execution_device, fits_in_memory, lazy_model
from bakeedit.models.reference import HUB_ID as _HUB_ID
from bakeedit.models.reference import ModelSpec
from bakeedit.models.registry import spec_by_name

_DAMAGED = "the file is damaged or incomplete: download or save the checkpoint again"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
Execution = Literal["auto", "in_memory", "blockwise"]
EXECUTIONS = ("auto", "in_memory", "blockwise")


@dataclass
class ModelSource:
    """Where a model came from: what provenance and the model card cite."""

    ref: str
    kind: str  # embedded | gguf | local | hub
    path: Path
    revision: str | None = None
    base_model: str | None = None  # Hub id to cite as base_model, when known
    license: str | None = None
    file_hashes: dict[str, str] = field(default_factory=dict)
    weights: str | None = None  # a GGUF source: its file, quantization, and that it was de-quantized

    def hash_inputs(self) -> dict[str, str]:
        """sha256 of the config and weight files the model was loaded from (computed once; digests already taken,
        e.g. by the low-memory apply while it streamed, may be put into ``file_hashes`` first)."""
        for f in sorted(self.path.iterdir()):
            if f.name not in self.file_hashes and f.is_file() and (
                    f.suffix in WEIGHT_SUFFIXES or f.name in ("config.json", "SOURCE_GGUF_SHA256")):
                self.file_hashes[f.name] = file_sha256(f)
        return self.file_hashes


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any | None
    layout: ModelLayout
    source: ModelSource
    dtype: torch.dtype
    #: True when ``model`` runs blockwise from the shards (``bakeedit.models.lazy``): its parameters are on meta.
    blockwise: bool = False
    #: Which execution path was taken and why, as one sentence (``bakeedit locate``/``eval`` print it).
    execution_reason: str = ""

    @property
    def device(self) -> torch.device:
        """Where the inputs go (the first parameter's device; with a device_map, the embedding's; for a blockwise
        model the device its blocks are loaded onto, never meta)."""
        return execution_device(self.model)


def resolve_source(spec: ModelSpec) -> ModelSource:
    """Turn ``spec.id`` into a local folder, converting or downloading as needed."""
    ref = spec.id
    if spec.hub_only:  # a recipe's org/name that is no path beside the recipe: never a folder of the cwd
        return _from_hub(ref, spec.revision)
    if ref in EMBEDDED_ALIASES:
        gguf = embedded_gguf_path()
        return ModelSource(
            ref=ref, kind="embedded", path=gguf_to_safetensors(gguf),
            base_model=EMBEDDED_BASE_MODEL, license=EMBEDDED_LICENSE, weights=gguf_weights_note(gguf),
        )
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.id: no such GGUF file '{ref}'")
        return ModelSource(ref=ref, kind="gguf", path=gguf_to_safetensors(path), weights=gguf_weights_note(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"model.id: folder '{ref}' has no config.json", hint="point at a transformers checkpoint folder"
            )
        return ModelSource(ref=ref, kind="local", path=path.resolve(), revision=spec.revision)
    if path.is_absolute() or not _HUB_ID.match(ref):
        raise ModelLoadError(
            f"model.id: unknown model '{ref}': not a local folder, a .gguf file, the embedded default or a Hub id",
            hint="use 'embedded' for the built-in SmolLM2-135M-Instruct, a path, or 'org/name'",
        )
    return _from_hub(ref, spec.revision)


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "*.md"],
            )
        )
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"model.id: no Hub repository '{repo_id}' (or no access to it)") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(
            f"model.id: could not fetch '{repo_id}' from the Hub and it is not in the local cache",
            hint="check the id and your network, or download it once and run with HF_HUB_OFFLINE=1",
        ) from exc
    license_ = None
    with contextlib.suppress(Exception):  # offline: the license stays unknown, the card says so
        license_ = (model_info(repo_id, revision=revision).card_data or {}).get("license")
    return ModelSource(
        ref=repo_id, kind="hub", path=folder, revision=folder.name, base_model=repo_id, license=license_
    )


def read_config_json(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a mapping; a malformed file is a :class:`ModelLoadError` naming it (transformers and
    the custom-module check would each raise their own, less useful, exception)."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model.id: {path}: no such file",
                             hint="point at a transformers checkpoint folder") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"model.id: {path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", hint=_DAMAGED
        ) from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"model.id: {path}: not a JSON text file", hint=_DAMAGED) from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"model.id: {path}: not a transformers config (a JSON object)", hint=_DAMAGED)
    return raw


def local_layout(folder: Path, arch: str | None = None) -> ModelLayout | None:
    """The layout of a local checkpoint folder from its config.json alone (no weights), for checks that should
    run before a model loads; ``None`` when it cannot be known that cheaply (no folder, remote code, exotic config).
    A malformed config.json is an error here already."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    raw = read_config_json(folder)
    if "auto_map" in raw:  # remote code (a custom module among them): its config class is not run at recipe time
        return None
    from transformers import AutoConfig

    try:
        return ModelLayout.for_config(AutoConfig.from_pretrained(folder), arch=arch)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, BakeeditError):
        return None  # load_model reports it, with the whole story


def shard_damage(folder: Path) -> str | None:
    """The first ``.safetensors`` file of ``folder`` whose header is truncated or corrupt, as an error line."""
    for shard in sorted(Path(folder).glob("*.safetensors")):
        try:
            read_shard(shard)
        except ModelLoadError as exc:
            return str(exc)
    return None


def _load_failure(spec: ModelSpec, source: ModelSource, exc: Exception) -> ModelLoadError:
    """What went wrong loading the weights, naming the damaged file when there is one."""
    damaged = shard_damage(source.path)
    if damaged is not None:
        return ModelLoadError(f"model.id: {damaged}", hint=_DAMAGED)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelLoadError(f"model.id: cannot load '{spec.id}': {first}")


def resolve_dtype(name: str, config: Any, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 is 7x slower there, see ENVIRONMENT.md), else the checkpoint's dtype."""
    if name != "auto":
        return getattr(torch, name)
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float32


def stored_dtype(folder: Path, config: Any = None) -> torch.dtype | None:
    """The float dtype ``folder``'s weights are stored in: what a bake saves unless the recipe's ``model.dtype``
    asks for another, whatever dtype the model *ran* in (``auto`` upcasts bf16 to float32 on CPU).

    Read from the safetensors headers (the float dtype holding the most bytes, so float32 norms beside bf16
    matrices do not count); for other formats the config's ``dtype``; ``None`` when neither says."""
    counts: dict[torch.dtype, int] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        try:
            entries = read_shard(shard).entries.values()
        except ModelLoadError:
            continue  # not part of the checkpoint, or damaged: loading the model reports that
        for entry in entries:
            if entry.dtype in FLOAT_DTYPES:
                counts[FLOAT_DTYPES[entry.dtype]] = counts.get(FLOAT_DTYPES[entry.dtype], 0) + entry.nbytes
    if counts:
        return max(counts, key=counts.__getitem__)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    named = getattr(torch, named, None) if isinstance(named, str) else named
    return named if isinstance(named, torch.dtype) and named.is_floating_point else None


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device: '{name}' requested but no CUDA device is available")
    return name


def _custom_module_config(path: Path, spec: ModelSpec):
    """For a bakeedit custom-module checkpoint (a nonlinear edit, docs/nonlinear.md): its base architecture's config,
    which gives the layout (the module adds hooks, not parameters); ``None`` for any other folder.

    Its ``modeling_bakeedit.py`` runs when the model loads, so, as in transformers, only with trust_remote_code."""
    if not is_custom_module(path):
        return None
    if not spec.trust_remote_code:
        raise ModelLoadError(
            f"model.id: '{spec.id}' is a bakeedit custom-module checkpoint: loading it runs its modeling_bakeedit.py",
            hint="read that file, then pass --trust-remote-code (or model.trust_remote_code: true in a recipe)",
        )
    return read_base_config(path)


def check_architecture(config, arch: str | None) -> None:
    """Refuse an unknown architecture before the weights load. For a ``model_type`` no file names, the model is
    built on the meta device (no memory) so its module names can be matched against the known tables: the error
    then offers the matching one as ``model.arch`` (``ModelLayout.for_model`` raises it)."""
    model_type = (getattr(config, "text_config", None) or config).model_type
    if arch is not None:
        spec_by_name(arch, model_type)
        return
    try:
        spec_for_model_type(model_type)
    except UnsupportedArchitecture as refusal:
        from transformers import AutoModelForCausalLM  # start-up time: transformers loads when a model does

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, TypeError):  # transformers has no causal-LM class for it either
            raise refusal from None
        ModelLayout.for_model(skeleton)  # raises, offering the table its module names match (if one does)
        raise


def choose_execution(execution: str, source: ModelSource, dtype: torch.dtype, custom: bool = False,
                     device_map: str | None = None) -> tuple[bool, str]:
    """``(blockwise, reason)``: the path ``execution`` (``auto``, ``in_memory``/``in-memory`` or ``blockwise``) takes
    for this checkpoint, with the reason as one sentence. ``auto`` is blockwise only when the checkpoint in the run
    dtype does not fit in the memory available now (:func:`bakeedit.models.lazy.fits_in_memory`)."""
    execution = execution.replace("-", "_")
    if execution not in EXECUTIONS:
        raise ModelLoadError(f"execution: '{execution}' is not one of auto, in-memory, blockwise")
    if execution == "in_memory":
        return False, "in memory: requested"
    cannot = ("a custom-module checkpoint runs its own modeling code, which blockwise execution does not wrap" if custom
              else "model.device_map spreads the model over devices already" if device_map else None)
    if execution == "blockwise":
        if cannot is not None:
            raise ModelLoadError(f"execution: blockwise is not possible here: {cannot}",
                                 hint="run in memory (--execution in-memory)")
        return True, "blockwise: requested"
    if cannot is not None:
        return False, f"in memory: {cannot}"
    fits, why = fits_in_memory(source.path, dtype)
    return (False, f"in memory: {why}") if fits else (True, f"blockwise: {why}")


def load_model(spec: ModelSpec | str, source: ModelSource | None = None,
               execution: Execution | str = "in_memory") -> LoadedModel:
    """Load the model, its tokenizer (if the folder has one) and its :class:`ModelLayout`.

    ``execution`` (see :func:`choose_execution`): ``blockwise`` builds the model on the meta device and runs it one
    block at a time from the safetensors shards (``bakeedit.models.lazy``; GGUF and embedded sources are converted
    to a safetensors folder first, so this works for every kind); ``auto`` does so only when the checkpoint does not
    fit in memory. The default stays ``in_memory``: callers that change weights (folding, saving) need real ones.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = ModelSpec(id=spec) if isinstance(spec, str) else spec
    source = source or resolve_source(spec)
    read_config_json(source.path)  # a malformed config.json, named, before any reader trips over it
    custom = _custom_module_config(source.path, spec)
    try:
        config = custom or AutoConfig.from_pretrained(source.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"model.id: cannot read {source.path / 'config.json'}: {first}") from exc
    check_architecture(config, spec.arch)  # fail before loading gigabytes
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, config, device)
    blockwise, reason = choose_execution(execution, source, dtype, custom is not None, spec.device_map)
    if blockwise:
        damaged = shard_damage(source.path)
        if damaged is not None:
            raise ModelLoadError(f"model.id: {damaged}", hint=_DAMAGED)
        model = lazy_model(source.path, config, dtype, device, trust_remote_code=spec.trust_remote_code,
                           arch=spec.arch)
        return LoadedModel(model=model, tokenizer=_load_tokenizer(source), layout=ModelLayout.for_model(
            model, arch=spec.arch), source=source, dtype=dtype, blockwise=True, execution_reason=reason)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.device_map:
        try:
            import accelerate  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                "model.device_map needs accelerate", hint="pip install 'bakeedit[multigpu]'"
            ) from exc
        kwargs["device_map"] = spec.device_map
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise _load_failure(spec, source, exc) from exc
    if not spec.device_map:
        model.to(device)
    model.eval()
    tokenizer = _load_tokenizer(source)
    layout = (ModelLayout.for_config(config, arch=spec.arch) if custom is not None
              else ModelLayout.for_model(model, arch=spec.arch))
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, source=source, dtype=dtype,
                       execution_reason=reason)


def _load_tokenizer(source: ModelSource) -> Any | None:
    """The folder's tokenizer, ``None`` when it has no tokenizer files; a damaged one is a named error."""
    from transformers import AutoTokenizer

    if not any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:  # tokenizers raises plain Exceptions for damaged files; any failure here is the file's
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"model.id: cannot read the tokenizer in {source.path}: {first}", hint=_DAMAGED) from exc
