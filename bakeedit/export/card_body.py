"""The markdown body of the model card: one function per section, each reading only the card's context.

Section headings are stable (a golden-file test pins them); numbers come from ``bakeedit.json`` and
``eval/results.json`` and are formatted like ``eval/report.md`` (``value ± bootstrap standard error``; differences
paired, with the verdict of the edit against the random control: :mod:`bakeedit.evaluate.compare`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from bakeedit.evaluate.compare import comparison_pairs, verdict, verdict_pair
from bakeedit.evaluate.report import delta_cell, fmt, ideal_of, metric_label, ordered_labels
from bakeedit.export.card_context import CARD_FILE, EVAL_DIR, GENERATED_MARKER, CardContext
from bakeedit.models.arch import SITES

#: Where each locate method comes from; ``explicit`` and ``random`` are not papers.
METHODS: dict[str, tuple[str, str]] = {
    "knowbias": ("KnowBias: Mitigating Social Bias in LLMs via Know-Bias Neuron Enhancement",
                 "[arXiv:2601.21864](https://arxiv.org/abs/2601.21864). Neurons found by integrated gradients on "
                 "yes/no questions about social bias, then enhanced"),
    "ine": ("Understanding and Mitigating Gender Bias in LLMs via Interpretable Neuron Editing",
            "[arXiv:2501.14457](https://arxiv.org/abs/2501.14457). Value and query neurons scored by their effect "
            "on the stereotyped-vs-anti-stereotyped log-probability gap, kept by causal masking"),
    "coco": ("COCO: Uncovering Neuronal Mechanisms of Intrinsic Self-Debiasing in LLMs via Contrastive Learning",
             "ICLR 2026 submission (not accepted); follow-up [arXiv:2605.09647](https://arxiv.org/abs/2605.09647). "
             "Neurons whose responses are consistent within, and contrast between, stereotype-inviting and "
             "resisting prompts, then enhanced"),
    "random": ("Random control",
               "No paper: neurons drawn at random with the same count per layer and site as a reference set. "
               "This checkpoint is a control, not a debiased model"),
    "explicit": ("Hand-picked neurons", "No paper: the neurons were listed by hand in the recipe"),
}

#: Known weaknesses of each bias task's metric, shown only for the tasks that were run.
WEAKNESSES: dict[str, str] = {
    "crows_pairs": "CrowS-Pairs compares sentence likelihoods, not behaviour, and many of its pairs do not contrast "
                   "a stereotype cleanly (Blodgett et al., 2021, \"Stereotyping Norwegian Salmon\").",
    "stereoset_intrasentence": "StereoSet has the same data-quality problems (Blodgett et al., 2021); its ss score "
                               "is best at 50, which indifference also reaches.",
    "stereoset_intersentence": "StereoSet has the same data-quality problems (Blodgett et al., 2021); its ss score "
                               "is best at 50, which indifference also reaches.",
    "bbq": "BBQ's ambiguous-context bias score can be lowered by answering \"unknown\" more often, also where the "
           "context does disambiguate: read it together with the disambiguated accuracy.",
    "winogender": "WinoGender is small (120 templates), English-only and binary-gendered; a pronoun-probability gap "
                  "on occupations is one narrow probe.",
    "gender_words": "The gender-word probe measures next-word probabilities, not generated text.",
    "knowbias_qa": "The bias-knowledge questions are of the kind KnowBias locates its neurons with: for knowbias "
                   "edits this is an in-distribution check, not independent evidence.",
    "contrast_success": "The contrast prompts are of the kind COCO locates its neurons with: for coco edits this is "
                        "an in-distribution check, not independent evidence.",
}

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
SMALL_MODEL_PARAMS = 3e9


def _fmt(value: float | None, stderr: float | None = None, signed: bool = False) -> str:
    return fmt(value, stderr, signed)


def _json(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def public_ref(base) -> str:
    """How the card names the base model: its Hub id, else only the local folder's or file's name (a public card
    should not carry a path of the machine it was baked on)."""
    if base.hub_id:
        return base.hub_id
    return Path(base.ref).name if base.kind in ("local", "gguf") else base.ref


def header(ctx: CardContext) -> list[str]:
    prov = ctx.provenance
    base = public_ref(prov.base_model)
    name = prov.recipe.data.get("name", ctx.folder_name)
    description = " ".join(str(prov.recipe.data.get("description", "")).split())
    weights = (f" The weights edited are `{base}`'s GGUF file {prov.base_model.weights}; the result is saved as a "
               "float checkpoint (safetensors)." if prov.base_model.weights else "")
    lines = [GENERATED_MARKER, "", f"# {ctx.model_name}", "",
             f"`{base}` with {prov.plan.n_neurons} neurons edited by bakeedit (recipe `{name}`, "
             f"{prov.neurons.method} neurons, {_edit_form_words(prov.edit_form)}).{weights}"]
    if description:
        lines += ["", f"> {description}"]
    return lines


def _edit_form_words(form: str) -> str:
    return {"folded": "folded into the weights: a plain transformers checkpoint",
            "custom_module": "carried by a small custom module: load with trust_remote_code=True",
            "mixed": "linear part folded, the rest carried by a small custom module"}.get(form, form)


def what_was_edited(ctx: CardContext) -> list[str]:
    prov = ctx.provenance
    method = prov.neurons.method
    title, source = METHODS.get(method, (method, "A locate method registered with bakeedit"))
    lines = ["## What was edited and why", "",
             f"**Method: {title}.** {source}.", "",
             "Each listed neuron's activation `a` at its site was multiplied by a factor lambda (`a <- lambda * a`; "
             "> 1 enhances, 0 masks) or passed through the response map of the recipe; the intent is to change how "
             "strongly the model expresses social stereotypes while leaving everything else as it was.", "",
             "| parameter | value |", "|---|---|"]
    for key, value in sorted(prov.neurons.params.items()):
        lines.append(f"| locate.{_cell(key)} | `{_cell(_json(value))}` |")
    edit = prov.recipe.data.get("edit", {})
    for key in ("type", "lambda", "map", "params", "positions", "start"):
        if key in edit:
            lines.append(f"| edit.{key} | `{_cell(_json(edit[key]))}` |")
    if edit.get("overrides"):
        lines.append(f"| edit.overrides | {len(edit['overrides'])} (see recipe.yaml) |")
    lines.append(f"| edit applied | {'; '.join(f'`{d}`' for d in prov.plan.describe())} |")
    lines.append(f"| neurons | {prov.plan.n_neurons} ({len(prov.plan.groups)} folded groups, "
                 f"{len(prov.plan.module_groups)} module groups) |")
    if prov.fit:
        lines.append(f"| fitted on the locate split | `{_cell(_json(prov.fit.get('best', prov.fit)))}` |")
    lines.append(f"| dtype | {prov.dtype} |")
    return [*lines, "", *neuron_table(ctx)]


def neuron_table(ctx: CardContext) -> list[str]:
    counts = Counter((n.layer, n.site) for n in ctx.provenance.neurons.neurons)
    sites = [s for s in SITES if any(site == s for _, site in counts)]
    layers = sorted({layer for layer, _ in counts})
    total = ctx.n_layers or (max(layers, default=-1) + 1)
    lines = ["### Neurons per layer and site", "",
             f"Layers without edited neurons are left out ({len(layers)} of {total} layers are edited); "
             "`neurons.json` lists every neuron with its score.", "",
             "| layer | " + " | ".join(sites) + " | total |", "|---|" + "---|" * (len(sites) + 1)]
    for layer in layers:
        cells = [str(counts[(layer, s)] or "·") for s in sites]
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {sum(counts[(layer, s)] for s in sites)} |")
    lines.append("| total | " + " | ".join(str(sum(counts[(la, s)] for la in layers)) for s in sites)
                 + f" | {sum(counts.values())} |")
    if ctx.heatmap:
        lines += ["", f"![edited neurons per layer and site]({ctx.heatmap})"]
    return lines


def verification(ctx: CardContext) -> list[str]:
    v, execution = ctx.provenance.verification, ctx.provenance.execution
    if execution is not None and execution.path == "low-memory":  # verify_blocks: no model was reloaded whole
        return ["## Verification", "",
                f"The model does not fit in memory, so the checkpoint was checked block by block ({v.compared}). "
                f"The largest absolute difference of the edited blocks' outputs over {v.n_tokens} positions of "
                f"{v.n_prompts} blocks was **{v.max_abs_logit_delta:.3g}** (tolerance {v.tolerance:.3g} in "
                f"{v.dtype}); every tensor against the fold of the base: {v.exact}: "
                f"**{'passed' if v.passed else 'FAILED'}**. `bakeedit verify --blocks` repeats this check and first "
                "re-hashes every file of the folder against `bakeedit.json`.",
                "", "This shows the checkpoint does exactly what the edit specifies; whether the edit reduces bias "
                "is what the evaluation below measures."]
    return ["## Verification", "",
            f"The saved checkpoint was reloaded and compared with the base model running the same edit through "
            f"hooks ({v.compared}). The largest absolute logit difference over {v.n_tokens} tokens of "
            f"{v.n_prompts} probe prompts was **{v.max_abs_logit_delta:.3g}** (mean {v.mean_abs_logit_delta:.3g}, "
            f"tolerance {v.tolerance:.3g} in {v.dtype}, largest logit {v.max_abs_logit:.3g}): "
            f"**{'passed' if v.passed else 'FAILED'}**. `bakeedit verify` repeats this check and first re-hashes "
            "every file of the folder against `bakeedit.json`.",
            "", "This shows the checkpoint does exactly what the edit specifies; whether the edit reduces bias is "
            "what the evaluation below measures."]


def _metric_rows(ctx: CardContext, kind: str, labels: list[str], comparisons: dict) -> list[str]:
    by_task: dict[str, dict] = {}
    for label in labels:
        for r in ctx.run.results[label]:
            if r.kind == kind:
                by_task.setdefault(r.task, {})[label] = r
    pairs = comparison_pairs(labels)
    judged = verdict_pair(labels) if pairs else None
    head = ["task", "metric", "ideal", *labels, *[f"{a} − {b}" for a, b in pairs]]
    head += [f"verdict ({judged[0]} vs {judged[1]})"] if judged else []
    rows = ["| " + " | ".join([*head, "n"]) + " |", "|" + "---|" * (len(head) + 1)]
    for task, results in by_task.items():
        first = next(iter(results.values()))
        diffs = comparisons.get(task, {})
        for name in first.metrics:
            ideal = ideal_of(first, name)
            values = {lab: results[lab].metrics.get(name) if lab in results else None for lab in labels}
            cells = [task, metric_label(task, name), "—" if ideal is None else f"{ideal:g}"]
            cells += [_fmt(m.value, m.stderr) if m else "—" for m in values.values()]
            for a, b in pairs:
                cells.append(delta_cell(diffs.get((a, b), {}).get(name)))
            if judged:
                cells.append(verdict(diffs.get(judged, {}).get(name), judged[1]))
            cells.append(str(max((m.n for m in values.values() if m), default=0)))
            rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows if len(rows) > 2 else []


def evaluation(ctx: CardContext) -> list[str]:
    lines = ["## Evaluation", ""]
    if ctx.run is None:
        return [*lines, "No evaluation was run for this checkpoint (`bakeedit eval OUT --baseline BASE --control "
                        "OUT/neurons-random.json` writes one into `eval/`): nothing on this card shows that the "
                        "edit changes bias or keeps capability."]

    labels = ordered_labels(ctx.run.results)
    described = [f"**{lab}**: {ctx.run.models.get(lab, {}).get('description', lab)}" for lab in labels]
    limit = ctx.run.config.get("limit")
    lines += ["Models: " + "; ".join(described) + ".",
              "", ("Each task was scored on a seeded sample of at most "
                   f"{limit} items (seed {ctx.run.config.get('seed', 0)}); " if limit else "Each task used all its "
                   "items; ") + "values are `value ± bootstrap standard error` (clusters of related items resampled "
              "together), n is the number of items. `a − b` columns are paired differences: every model scored "
              "the same items, and their ± and p-values come from one cluster bootstrap of both models († marks "
              "an unpaired difference of results without per-item scores). The verdict says whether the edit is "
              "better than the random-neuron control (closer to the unbiased value, or moved in the metric's "
              "direction), with the two-sided p-value of that gain; editing any neurons may move a score, so "
              "only a metric that beats the control is evidence for these neurons. The full report, per "
              f"category, is in [`{EVAL_DIR}/report.md`]({EVAL_DIR}/report.md)."]
    comparisons = ctx.comparisons()
    reduced = ctx.bias_reductions()
    if reduced:
        lines += ["", "**The edit reduces bias** on " + ", ".join(f"{t} {m}" for t, m in reduced)
                  + ": there it beats the random-neuron control (paired bootstrap, p < 0.05). On the other bias "
                  "metrics it was not shown to."]
    else:
        why = ("no random-neuron control was evaluated" if "control" not in ctx.run.results
               else "on no bias metric did it beat the random-neuron control (paired bootstrap, p < 0.05)")
        lines += ["", f"**The edit was not shown to reduce bias**: {why}."]
    for kind, title in (("bias", "Bias"), ("capability", "Capability")):
        rows = _metric_rows(ctx, kind, labels, comparisons)
        lines += ["", f"### {title}", ""]
        lines += rows or [f"No {kind} task was run: this card has no evidence about the edit's "
                          f"{'effect on bias' if kind == 'bias' else 'cost to general ability'}."]
    lines += ["", "### Data", "", "| task | version | items | source | sha256 |", "|---|---|---|---|---|"]
    seen = set()
    for label in labels:
        for r in ctx.run.results[label]:
            if r.task not in seen:
                seen.add(r.task)
                lines.append(f"| {r.task} | {r.version} | {r.n} | `{_cell(r.data_source)}` | "
                             f"`{r.data_sha256[:16]}` |")
    if ctx.run.skipped:
        lines += ["", "Not run: " + "; ".join(f"{t} ({why})" for t, why in ctx.run.skipped.items()) + "."]
    return lines


def how_to_load(ctx: CardContext) -> list[str]:
    prov = ctx.provenance
    where = ctx.repo_id or f"path/to/{ctx.folder_name}"
    module = prov.custom_module
    lines = ["## How to load", ""]
    if prov.edit_form == "folded" or module is None:
        return [*lines, "The edit is folded into the weights: this is a plain transformers checkpoint, loaded "
                        "without any bakeedit code.", "", "```python",
                        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                        f"model = AutoModelForCausalLM.from_pretrained({where!r})",
                        f"tokenizer = AutoTokenizer.from_pretrained({where!r})", "```"]
    why = ("nonlinear response maps or last-position scaling change an activation as a function of itself or of "
           "the token position, which no change of a weight matrix can express")
    return [
        *lines,
        f"`trust_remote_code=True` is required: {why}. That part of the edit ships as code: "
        f"`{module.module_file}` ({module.module_lines} lines, imports only torch, safetensors and transformers; "
        f"sha256 `{module.module_sha256}`) reads `{module.edit_file}` (sha256 `{module.edit_sha256}`) and hooks the "
        f"listed projections of `{module.base_class}`. Read it before loading it, and pin the revision you read.",
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f"model = AutoModelForCausalLM.from_pretrained({where!r}, trust_remote_code=True)  # add revision=...",
        f"tokenizer = AutoTokenizer.from_pretrained({where!r}, trust_remote_code=True)", "```",
        "", "Without `trust_remote_code=True` transformers refuses this folder (its config has a model type of its "
        "own; the tokenizer reads that config too) instead of silently loading the unedited weights.",
    ]


def _n_params(ctx: CardContext) -> float | None:
    width = BYTES_PER_PARAM.get(ctx.provenance.dtype)
    weights = sum(size for name, size in ctx.files.items() if name.endswith(".safetensors"))
    return weights / width if width and weights else None


def _count(n: float) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def limitations(ctx: CardContext) -> list[str]:
    prov = ctx.provenance
    items = ["The verification above is numerical (the checkpoint equals the specified edit); it says nothing about "
             "safety or fairness in use.",
             "The bias benchmarks are English, mostly US-centred, cover a handful of social categories with binary or "
             "templated contrasts, and score likelihoods or multiple-choice answers. They do not cover open-ended "
             "generation, other languages or cultures, intersectional groups, or harms other than stereotyping.",
             "A neuron edit acts on every input, not only on biased ones: check the model on your own use before "
             "deploying it."]
    n = _n_params(ctx)
    if n is not None and n < SMALL_MODEL_PARAMS:
        items.append(f"This is a small model (about {_count(n)} parameters): its benchmark scores are close to "
                     "chance on several tasks and differences between edits are noisy; findings may not transfer to "
                     "larger models.")
    if ctx.run is not None:
        if ctx.run.config.get("limit"):
            items.append(f"Every task was scored on at most {ctx.run.config['limit']} items: differences smaller "
                         "than about two standard errors are not distinguishable from noise.")
        if "control" not in ctx.run.results:
            items.append("No random-neuron control was evaluated, so the effect of these neurons cannot be told "
                         "apart from the effect of editing any neurons of the same number.")
        tasks = {r.task for results in ctx.run.results.values() for r in results}
        items += [WEAKNESSES[t] for t in sorted(tasks) if t in WEAKNESSES]
    if prov.neurons.method == "knowbias" and prov.edit_form == "folded":
        items.append("KnowBias's released code scales its neurons at the last position only; this checkpoint scales "
                     "them at every position (the foldable form), a documented deviation.")
    if not prov.base_model.license:
        items.append("The base model's license could not be read when the checkpoint was baked (offline, a local "
                     "folder or a GGUF file): `license: unknown` above. Check the base model's own terms, which "
                     "apply to this derived checkpoint.")
    return ["## Limitations", "", *[f"- {item}" for item in items]]


def reproduce(ctx: CardContext) -> list[str]:
    prov = ctx.provenance
    base = prov.base_model
    lines = ["## How to reproduce", "",
             f"`recipe.yaml` in this repository is the recipe exactly as it was run (sha256 "
             f"`{prov.recipe.sha256[:16]}`), with bakeedit {prov.bakeedit_version} on {prov.created_at}:", "",
             "```bash", "bakeedit apply recipe.yaml -o OUT   # locate or read neurons, fold, save, verify",
             "bakeedit verify OUT                 # re-hash files, compare with the runtime edit", "```", "",
             f"Base model: `{public_ref(base)}` ({base.kind}"
             + (f", revision `{base.revision}`" if base.revision else "") + "); its input files had sha256 "
             + ", ".join(f"`{name}` `{digest[:16]}`" for name, digest in sorted(base.input_sha256.items())) + "."]
    if prov.recipe.data.get("locate"):
        lines += ["", "Locating again needs the same data and seeds; to reuse exactly these neurons, replace the "
                      "recipe's `locate:` block with `neurons_file: neurons.json`."]
    if ctx.run is not None and ctx.run.config.get("tasks"):
        cfg = ctx.run.config
        lines += ["", "Evaluation: `bakeedit eval OUT --baseline BASE --tasks " + ",".join(cfg["tasks"])
                  + (f" --limit {cfg['limit']} --seed {cfg.get('seed', 0)}" if cfg.get("limit") else "")
                  + ("` with `--control` (a random-neuron set of the same shape)" if "control" in ctx.run.results
                     else "`") + "."]
    return lines


def evidence(ctx: CardContext) -> list[str]:
    """Every file beside the card with its recorded sha256 (the heat map just drawn: its new one). The card cannot
    list its own hash; ``bakeedit.json`` records it, and its own digest (``manifest_sha256``)."""
    recorded = {**ctx.provenance.files_sha256, **ctx.fresh_sha256}
    lines = ["## Files and provenance", "",
             "`bakeedit.json` holds the recipe, the neuron set, the edit plan, the verification and the sha256 of "
             f"every file of this repository, `{CARD_FILE}` (this card) included, plus a digest of its own content; "
             "the card is regenerated from it with `bakeedit card`.", "", "| file | bytes | sha256 |",
             "|---|---|---|"]
    for name, size in ctx.files.items():
        if name in recorded and name != CARD_FILE:
            lines.append(f"| `{_cell(name)}` | {size} | `{recorded[name][:16]}` |")
    return lines


SECTIONS = (header, what_was_edited, verification, evaluation, how_to_load, limitations, reproduce, evidence)


def render_body(ctx: CardContext) -> str:
    """The card's markdown (no front matter)."""
    out: list[str] = []
    for section in SECTIONS:
        out += [*section(ctx), ""]
    return "\n".join(out)
