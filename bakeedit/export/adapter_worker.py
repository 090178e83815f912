"""Run by ``export/verify_adapter.py`` in a fresh ``python -I`` process: load adapters the way a user would.

Only torch, transformers, peft and safetensors are imported, never bakeedit (the result lists any bakeedit module
that got imported anyway). Per check of the job file: load the base folder with ``AutoModelForCausalLM``, wrap it
with ``PeftModel.from_pretrained``, compare peft's own state dict of the adapter with the saved file (keys and
values), write the logits of the probe's real positions, then ``merge_and_unload()`` and compare every merged
tensor with the reference (a baked checkpoint, or the base checkpoint with the expected edited tensors on top).
A check that raises is reported with its error; the others still run.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

#: Relative tolerance of a merged tensor against the reference, times the reference's max |value|: a LoRA merge
#: adds ``(lambda - 1) W`` to ``W`` where the fold multiplies by ``lambda``, one rounding apart.
MERGE_RTOL = {"float32": 1e-6, "bfloat16": 2.0**-7, "float16": 2.0**-10}


class Tensors:
    """The tensors of a safetensors checkpoint folder by name, read on demand."""

    def __init__(self, folder: str | None) -> None:
        self.where: dict[str, Path] = {}
        for path in sorted(Path(folder).glob("*.safetensors")) if folder else ():
            with safe_open(str(path), "pt") as handle:
                self.where.update(dict.fromkeys(handle.keys(), path))

    def get(self, name: str) -> torch.Tensor | None:
        # GPT-2 checkpoints on the Hub store ``h.0...`` for the model's ``transformer.h.0...``
        for candidate in (name, name.split(".", 1)[-1]):
            if candidate in self.where:
                with safe_open(str(self.where[candidate]), "pt") as handle:
                    return handle.get_tensor(candidate)
        return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _keys(model, adapter: Path) -> dict[str, list[str]]:
    from peft import get_peft_model_state_dict

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    changed = [k for k in sorted(saved.keys() & loaded.keys())
               if saved[k].shape != loaded[k].shape or not torch.equal(saved[k].double(), loaded[k].double())]
    return {"missing": sorted(saved.keys() - loaded.keys()), "unexpected": sorted(loaded.keys() - saved.keys()),
            "changed": changed}


def _merge(merged, check: dict) -> dict:
    reference = Tensors(check["baked"] or check["base"])
    overrides = load_file(check["expected"]) if check["expected"] else {}
    base = Tensors(check["base"])
    rtol = MERGE_RTOL.get(check["dtype"], MERGE_RTOL["bfloat16"])
    state = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    compared = bit_exact = 0
    max_diff = 0.0
    differing, not_compared = [], []
    for name, got in sorted(state.items()):
        expected = overrides.get(name)
        if expected is None:
            expected = reference.get(name)
        if expected is None:
            not_compared.append(name)
            continue
        compared += 1
        if _same(got, expected):
            bit_exact += 1
            continue
        if got.shape != expected.shape:
            diff, close = float("inf"), False
        else:
            delta = (got.double() - expected.double()).abs()
            diff = float(delta.max())
            close = bool((delta <= rtol * float(expected.double().abs().max())).all())
        max_diff = max(max_diff, diff)
        original = base.get(name)
        differing.append({"name": name, "max_abs_diff": diff, "close": close,
                          "equal_to_base": original is not None and _same(got, original.to(got.dtype))})
    return {"compared": compared, "bit_exact": bit_exact, "max_abs_diff": max_diff, "rtol": rtol,
            "differing": differing, "missing": sorted(set(overrides) - set(state)), "not_compared": not_compared}


def run_check(check: dict) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, check["dtype"])
    base = AutoModelForCausalLM.from_pretrained(check["base"], dtype=dtype).to(check["device"]).eval()
    model = PeftModel.from_pretrained(base, check["adapter"]).eval()
    result: dict = {"keys": _keys(model, Path(check["adapter"])), "peft_class": type(model).__name__}
    inputs = {k: v.to(check["device"]) for k, v in load_file(check["inputs"]).items()}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    save_file({"logits": logits[inputs["attention_mask"].bool()].cpu().contiguous()}, check["logits"])
    with torch.no_grad():
        result["merge"] = _merge(model.merge_and_unload(), check)
    return result


def main(job_path: str) -> None:
    import peft
    import transformers

    warnings.simplefilter("ignore")  # peft and transformers warn on load; the key and value checks decide
    job = json.loads(Path(job_path).read_text())
    results = []
    for check in job["checks"]:
        try:
            results.append({"error": None, **run_check(check)})
        except Exception as exc:  # reported per check: the parent turns it into a failed verification
            results.append({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"})
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    Path(job["result"]).write_text(json.dumps({
        "versions": versions, "checks": results,
        "bakeedit_imported": sorted(m for m in sys.modules if m == "bakeedit" or m.startswith("bakeedit.")),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
