"""llama.cpp itself as a client of a baked GGUF: its logits against transformers' reading of the same file.

    .venv/bin/python bench/llamacpp_check.py [--baked PATH] [--base PATH] [--out DIR] [--no-control]

llama.cpp runs through ``llama-cpp-python`` (pinned below) in its own virtual environment under
``$BAKEEDIT_CACHE/llamacpp-venv``, built once from the source distribution (a CPU build, ``GGML_NATIVE``, no BLAS;
minutes; the build time is recorded in the environment and printed on every run). It is no test dependency.

By default an edit is baked into the embedded SmolLM2-135M-Instruct Q4_1 GGUF with
:func:`bakeedit.export.gguf.bake_gguf` (``DEFAULT_SITES`` in layers ``DEFAULT_LAYERS``: ``attn.q`` and ``attn.k``
rows, which go through llama.cpp's Q/K row permutation, ``attn.v``, ``mlp.gate`` and ``mlp.up`` rows; lambdas 0 and 2,
whose block-scale products are exact, and 1.5, which rounds); ``--baked PATH`` checks an existing baked folder (its
``bakeedit.json`` names the source and the plan) or file instead.

The same token ids go to both tools (tokenised once with transformers' tokenizer from the GGUF, fed to llama.cpp
with ``logits_all=True``), logits at every position of ``DEFAULT_PROMPTS``:

- **llama.cpp** (a small worker run with the child environment's python, one thread, llama.cpp's default context:
  f16 KV cache, activations quantised to Q8 for the quantised matmuls) on the base and the baked file;
- **transformers** in this process (``from_pretrained(folder, gguf_file=..., dtype=float32)``, de-quantised to
  float32) on the same two files, and on the base with the plan's runtime hooks (``edit/hooks.py``: the edit the
  bake is meant to carry).

Printed per file: max and mean ``|llama.cpp - transformers|`` and the argmax agreement over all positions, against
transformers' reading of the same file and against the runtime edit; the edit's own effect under both tools, and
how far the two tools' effects differ; llama.cpp's greedy generation (``--max-tokens``) from the baked file and the
base next to transformers' greedy tokens from the same files. Two controls (skip with ``--no-control``), both
baked unverified and run through llama.cpp only:

- **control**: the same plan with ``permute_qk=False`` (HF Q/K channel ``c`` written to GGUF row ``c``, the wrong
  rows; the check refuses it): against the runtime edit it must be clearly worse than the baked file, which shows
  the comparison can see a Q/K mapping error;
- **probe**: ``PROBE``, one ``mlp.up`` row at lambda 1.001, an edit too small to matter (transformers' logits move
  by about 1e-4): how far it moves llama.cpp's logits is llama.cpp's own arithmetic noise (it rounds the
  activations to 8 bits per block before every quantised matmul, so any change re-rounds them), which is why the
  figure to compare is the per-file agreement, not the edit's effect seen through llama.cpp.

Exit status 1 when the baked file's agreement is clearly worse than the base's (mean difference above
``RATIO_LIMIT`` times the base's) or generation produced nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bakeedit.models.embedded import cache_root, embedded_gguf_path

LLAMA_CPP = "llama-cpp-python==0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF"
BUILD_RECORD = "bakeedit-build.json"
DEFAULT_SITES = ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up")
DEFAULT_LAYERS = (3, 17)
DEFAULT_CHANNELS = (7, 45, 130)  # Q/K: within-head 7 and 45 (-> rows 14 and 27 of head 0), 130 = head 2's 2 (-> 132)
DEFAULT_LAMBDAS = (0.0, 2.0, 1.5)
CHAT_PROMPT = "Write one sentence about the sea."
RATIO_LIMIT = 2.0
#: (layer, site, channel, lambda) of the noise probe: an edit too small to matter, to show llama.cpp's own noise
PROBE = (3, "mlp.up", 7, 1.001)

WORKER = r'''
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

request = json.load(open(sys.argv[1]))
out = {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
       "files": {}}
arrays = {}
for name, path in request["files"].items():
    started = time.monotonic()
    llm = Llama(model_path=path, n_ctx=request["n_ctx"], n_batch=request["n_ctx"], logits_all=True,
                n_threads=request["threads"], n_threads_batch=request["threads"], seed=0, verbose=False)
    entry = {"load_s": time.monotonic() - started, "n_vocab": llm.n_vocab()}
    started = time.monotonic()
    for k, ids in enumerate(request["prompts"]):
        llm.reset()
        llm.eval(ids)
        arrays[f"{name}/{k}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    entry["logits_s"] = time.monotonic() - started
    entry["tokenizer_same"] = [llm.tokenize(text.encode(), add_bos=True, special=False) == ids
                               for text, ids in zip(request["texts"], request["prompts"])]
    if name in request["generate_for"]:
        started = time.monotonic()
        tokens = []
        for token in llm.generate(request["chat_ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0):
            if token in request["stop_ids"] or len(tokens) >= request["max_tokens"]:
                break
            tokens.append(int(token))
        entry["generate_s"] = time.monotonic() - started
        entry["generated"] = tokens
        entry["text"] = llm.detokenize(tokens).decode("utf-8", errors="replace")
    out["files"][name] = entry
    del llm
np.savez(sys.argv[2] + ".npz", **arrays)
json.dump(out, open(sys.argv[2] + ".json", "w"))
'''


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def llamacpp_python() -> tuple[Path, dict]:
    """The llama.cpp environment's interpreter, built (minutes, once) when missing, and its build record."""
    venv = cache_root() / "llamacpp-venv"
    python = venv / "bin" / "python"
    record_path = venv / BUILD_RECORD
    usable = python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not (usable and record_path.exists()):
        print(f"creating {venv} ({LLAMA_CPP} from source, CMAKE_ARGS={CMAKE_ARGS!r}); this takes minutes once",
              flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {**one_thread_env(), "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2", "FORCE_CMAKE": "1"}
        load, wall, cpu = os.getloadavg()[0], time.monotonic(), children_cpu()
        subprocess.run(["nice", "-n", "19", python, "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python",
                        "--no-cache-dir", LLAMA_CPP], check=True, env=env)
        record = {"spec": LLAMA_CPP, "cmake_args": CMAKE_ARGS, "build_wall_s": round(time.monotonic() - wall, 1),
                  "build_cpu_s": round(children_cpu() - cpu, 1),
                  "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "load_avg_start_end": [round(load, 2), round(os.getloadavg()[0], 2)]}
        record["version"] = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    return python, json.loads(record_path.read_text())


# ------------------------------------------------------------------------------------------------ the files


def default_plan():
    from bakeedit.edit.plan import EditPlan, ScaleGroup

    return EditPlan(groups=[ScaleGroup(layer=layer, site=site, indices=list(DEFAULT_CHANNELS),
                                       lambdas=list(DEFAULT_LAMBDAS))
                            for layer in DEFAULT_LAYERS for site in DEFAULT_SITES])


def layout_of(path: Path):
    from transformers import AutoConfig

    from bakeedit.models.arch import ModelLayout

    return ModelLayout.for_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))


def find_baked(path: Path, base: Path | None) -> tuple[Path, Path, object]:
    """(the baked .gguf, its source, the plan or None) of a baked folder or file."""
    from bakeedit.export.gguf import GgufRecord
    from bakeedit.export.provenance import PROVENANCE_FILE

    folder = path if path.is_dir() else path.parent
    record_file = folder / PROVENANCE_FILE
    record = GgufRecord.model_validate_json(record_file.read_text()) if record_file.is_file() else None
    if path.is_dir():
        found = [folder / record.gguf_file] if record else sorted(folder.glob("*.gguf"))
        if len(found) != 1:
            raise SystemExit(f"{folder}: expected one .gguf file (or a bakeedit.json naming it), found {found}")
        path = found[0]
    if base is None and record is not None and (folder / record.source.file).is_file():
        base = (folder / record.source.file).resolve()
    return path, base or embedded_gguf_path(), record.plan if record else None


# ------------------------------------------------------------------------------------------------ both tools


def run_llamacpp(python: Path, files: dict[str, Path], prompts: list[list[int]], texts: list[str],
                 chat_ids: list[int], stop_ids: list[int], generate_for: list[str], args, work: Path):
    request = {"files": {k: str(v) for k, v in files.items()}, "prompts": prompts, "texts": texts,
               "chat_ids": chat_ids, "stop_ids": stop_ids, "generate_for": generate_for,
               "max_tokens": args.max_tokens, "threads": args.threads, "n_ctx": 512}
    (work / "request.json").write_text(json.dumps(request))
    (work / "worker.py").write_text(WORKER)
    cpu, wall = children_cpu(), time.monotonic()
    subprocess.run(["nice", "-n", "19", python, work / "worker.py", work / "request.json", work / "result"],
                   check=True, env=one_thread_env())
    meta = json.loads((work / "result.json").read_text())
    meta["cpu_s"], meta["wall_s"] = children_cpu() - cpu, time.monotonic() - wall
    with np.load(work / "result.npz") as data:
        logits = {name: np.concatenate([data[f"{name}/{k}"] for k in range(len(prompts))]) for name in files}
    return logits, meta


def hf_logits(model, prompts: list[list[int]]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in prompts])


def hf_greedy(model, ids: list[int], max_tokens: int, stop_ids: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=stop_ids[0])[0, len(ids):].tolist()
    return out[:next((i for i, t in enumerate(out) if t in stop_ids), len(out))]


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(max |a - b|, mean |a - b|, argmax agreement) over every position."""
    diff = np.abs(a.astype(np.float64) - b)
    return float(diff.max()), float(diff.mean()), float((a.argmax(-1) == b.argmax(-1)).mean())


def leading_same(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baked", type=Path, help="an existing baked GGUF folder or file (default: bake one)")
    parser.add_argument("--base", type=Path, help="its source GGUF (default: from bakeedit.json, else embedded)")
    parser.add_argument("--out", type=Path, help="keep the default bake in this folder (default: a temporary one)")
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-control", action="store_true",
                        help="skip the two control files (unpermuted Q/K, noise probe)")
    parser.add_argument("--build-only", action="store_true", help="build the llama.cpp environment and stop")
    args = parser.parse_args()

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    load_start, cpu_start, started = os.getloadavg(), time.process_time(), time.monotonic()
    print(f"$ {command}\n{datetime.now(UTC).isoformat(timespec='seconds')}  load average at start "
          f"{' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
    python, build = llamacpp_python()
    print(f"llama.cpp: {build['spec']} (import reports {build['version']}), built from source in "
          f"{build['build_wall_s']:.0f} s wall / {build['build_cpu_s']:.0f} CPU s on {build['built_at']} "
          f"(load average {' -> '.join(f'{x:.2f}' for x in build.get('load_avg_start_end', []))}); "
          f"CMAKE_ARGS {build['cmake_args']!r}", flush=True)
    if args.build_only:
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bakeedit.edit.hooks import runtime_edit
    from bakeedit.edit.plan import EditPlan, ScaleGroup
    from bakeedit.export.gguf import bake_gguf
    from bakeedit.export.verify import DEFAULT_PROMPTS
    from bakeedit.models.arch import ModelLayout

    torch.set_num_threads(args.threads)
    os.environ.update({k: v for k, v in one_thread_env().items() if k not in os.environ})  # the bake's worker
    tmp = tempfile.TemporaryDirectory(prefix="bakeedit-llamacpp-")
    work = Path(tmp.name)
    timings: dict[str, tuple[float, float]] = {}  # step -> (wall s, CPU s of this process and its children)

    def clock(step, fn):
        wall, cpu = time.monotonic(), time.process_time() + children_cpu()
        value = fn()
        timings[step] = (time.monotonic() - wall, time.process_time() + children_cpu() - cpu)
        return value

    controls: dict[str, Path] = {}
    probe_plan = None
    if args.baked is None:
        base, plan = (args.base or embedded_gguf_path()).resolve(), default_plan()
        layout = layout_of(base)
        out = args.out or work / "baked"
        result = clock("bake + its transformers check", lambda: bake_gguf(
            base, plan, layout, out, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", overwrite=args.out is not None))
        baked, v = result.gguf, result.verification
        print(f"baked {baked}: {'; '.join(plan.describe())}, {plan.n_neurons} neurons: "
              f"{', '.join(DEFAULT_SITES)} of layers {DEFAULT_LAYERS}, channels {DEFAULT_CHANNELS}, lambdas "
              f"{DEFAULT_LAMBDAS}\n  bake_gguf's check: {v.kind}, max |delta logit| {v.max_abs_logit_delta:.3g} "
              f"(bound {v.bound:.3g}), effect {v.edit_effect:.3g}, {'passed' if v.passed else 'FAILED'}; changes: "
              + ", ".join(f"{c.tensor} {c.type} {'exact' if c.exact else f'rel {c.rel_error:.2g}'}"
                          for c in result.changes), flush=True)
        if not args.no_control:
            probe_plan = EditPlan(groups=[ScaleGroup(layer=PROBE[0], site=PROBE[1], indices=[PROBE[2]],
                                                     lambdas=[PROBE[3]])])
            controls = clock("control bakes (unverified)", lambda: {
                "control": bake_gguf(base, plan, layout, work / "control", permute_qk=False, verify=False,
                                     name="control-unpermuted").gguf,
                "probe": bake_gguf(base, probe_plan, layout, work / "probe", verify=False, name="probe").gguf})
    else:
        baked, base, plan = find_baked(args.baked.resolve(), args.base.resolve() if args.base else None)
        print(f"checking {baked} against its source {base}; plan: "
              + ("; ".join(plan.describe()) if plan else "none recorded (no runtime-edit comparison)"), flush=True)

    tokenizer = clock("tokenizer", lambda: AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name))
    texts = list(DEFAULT_PROMPTS)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    chat_text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False,
                                              add_generation_prompt=True)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    stop_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                       if isinstance(i, int) and i != tokenizer.unk_token_id})
    n_positions = sum(len(p) for p in prompts)

    files = {"base": base, "baked": baked, **controls}
    ll, meta = clock("llama.cpp worker (all files)", lambda: run_llamacpp(
        python, files, prompts, texts, chat_ids, stop_ids, ["base", "baked"], args, work))

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    hf: dict[str, np.ndarray] = {}
    hf_gen: dict[str, list[int]] = {}

    def transformers_base():
        model = load(base)
        hf["base"] = hf_logits(model, prompts)
        hf_gen["base"] = hf_greedy(model, chat_ids, args.max_tokens, stop_ids)
        layout = ModelLayout.for_model(model)
        for key, edit in (("hooked", plan), ("probe_hooked", probe_plan)):
            if edit is not None:
                with runtime_edit(model, layout, edit):
                    hf[key] = hf_logits(model, prompts)

    def transformers_baked():
        model = load(baked)
        hf["baked"] = hf_logits(model, prompts)
        hf_gen["baked"] = hf_greedy(model, chat_ids, args.max_tokens, stop_ids)

    clock("transformers: base (load, logits, greedy, runtime edits)", transformers_base)
    clock("transformers: baked (load, logits, greedy)", transformers_baked)

    rows = []
    for name, ref_same, ref_edit in (("base", "base", None), ("baked", "baked", "hooked"),
                                     ("control", None, "hooked"), ("probe", None, "probe_hooked")):
        if name in ll:
            rows.append((name, files[name].name, compare(ll[name], hf[ref_same]) if ref_same else None,
                         compare(ll[name], hf[ref_edit]) if ref_edit in hf else None))

    def cell(x):
        return "—" if x is None else f"{x[0]:.4f} / {x[1]:.5f} / {x[2]:.1%}"

    print(f"\nlogits at all {n_positions} positions of {len(prompts)} prompts (verify.DEFAULT_PROMPTS), vocab "
          f"{ll['base'].shape[1]}; llama.cpp tokenises them as transformers does: "
          f"{all(all(e['tokenizer_same']) for e in meta['files'].values())}")
    print("| file | llama.cpp vs transformers, same file: max / mean abs / argmax agree "
          "| llama.cpp vs transformers' runtime edit of the base: max / mean abs / argmax agree |")
    print("|---|---|---|")
    for name, fname, same, edit in rows:
        print(f"| {name} (`{fname}`) | {cell(same)} | {cell(edit)} |")
    base_same, baked_same = rows[0][2], rows[1][2]
    ratio = baked_same[1] / base_same[1]
    print(f"\nbaked / base, mean |llama.cpp - transformers|: {ratio:.3f}; max: {baked_same[0] / base_same[0]:.3f}")

    def effect(a, b):
        d = np.abs(a.astype(np.float64) - b)
        return f"{d.max():.3g} / {d.mean():.3g}"

    print(f"the edit's own effect, max / mean |baked - base|: transformers {effect(hf['baked'], hf['base'])}, "
          f"llama.cpp {effect(ll['baked'], ll['base'])}; |llama.cpp's effect - transformers'| "
          f"{effect(ll['baked'] - ll['base'], hf['baked'].astype(np.float64) - hf['base'])}")
    if "hooked" in hf:
        x = (hf["hooked"].astype(np.float64) - hf["base"]).ravel()
        for name in [n for n in ("baked", "control") if n in ll]:
            y = (ll[name].astype(np.float64) - ll["base"]).ravel()
            print(f"llama.cpp's effect ({name} - base) regressed on transformers' runtime edit (hooked - base): "
                  f"slope {x @ y / (x @ x):.3f}, correlation {np.corrcoef(x, y)[0, 1]:.3f} (noise unless the effect "
                  "is well above llama.cpp's own noise)")
        h = compare(hf["baked"], hf["hooked"])
        print(f"transformers, baked file vs runtime edit (bake_gguf's own check, on these prompts): max {h[0]:.2e}, "
              f"mean {h[1]:.2e}, argmax {h[2]:.1%}")
    if "probe" in ll:
        print(f"llama.cpp's arithmetic noise: layer {PROBE[0]} {PROBE[1]} channel {PROBE[2]} at lambda {PROBE[3]} "
              f"moves transformers' logits by {effect(hf['probe_hooked'], hf['base'])} (max / mean) and llama.cpp's "
              f"by {effect(ll['probe'], ll['base'])}")

    print(f"\ngreedy, {args.max_tokens} tokens at most, from the chat prompt {CHAT_PROMPT!r} ({len(chat_ids)} ids):")
    for name in ("baked", "base"):
        entry = meta["files"][name]
        print(f"  llama.cpp    {name:5s} ({len(entry['generated'])} tokens, {entry['generate_s']:.2f} s): "
              f"{entry['text']!r}")
        print(f"  transformers {name:5s} ({len(hf_gen[name])} tokens): {tokenizer.decode(hf_gen[name])!r}; the "
              f"same tokens as llama.cpp's for the first {leading_same(entry['generated'], hf_gen[name])}")
    gen = meta["files"]["baked"]["generated"]

    print(f"\nllama.cpp {meta['version']}, {args.threads} thread(s): {meta['system_info']}")
    print("llama.cpp worker: " + ", ".join(f"{k} load {e['load_s']:.2f} s, logits {e['logits_s']:.2f} s"
                                           for k, e in meta["files"].items()))
    for step, (wall, cpu) in timings.items():
        print(f"  {step}: {wall:.1f} s wall, {cpu:.1f} CPU s")
    load_end = os.getloadavg()
    print(f"total: {time.monotonic() - started:.0f} s wall; CPU s: this process {time.process_time() - cpu_start:.1f}, "
          f"children {children_cpu():.1f} (the bake's check worker and llama.cpp); load average at end "
          f"{' '.join(f'{x:.2f}' for x in load_end)}")
    tmp.cleanup()
    failed = ratio > RATIO_LIMIT or not gen
    print("verdict: " + ("FAILED" if failed else f"passed (baked/base mean ratio {ratio:.2f} <= {RATIO_LIMIT}, "
                                                 "generation ran)"))
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
