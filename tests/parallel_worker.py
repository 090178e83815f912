"""Run by tests/test_parallel.py, once plainly and once under ``torchrun --nproc-per-node 2`` (gloo on CPU).

Computations over items whose results rank 0 writes to ``OUT/<name>.json``:

- ``atp``: attribution patching (Nanda 2023; Syed et al. 2023, arXiv 2310.10348): per prompt, the first-order
  estimate ``a_i * d log P(target) / d a_i`` of zeroing channel ``i`` of ``attn.v`` and ``mlp.act`` at the last
  position, one item at a time (:func:`bakeedit.parallel.map_items`); the NeuronSet keeps the 12 channels with the
  largest mean absolute attribution.
- ``coco``, ``knowbias``, ``ine`` and ``random``: the registered methods through ``run_locate``, as ``bakeedit
  locate`` runs them (coco deals whole batches of items out in ``locate/responses.record_last_tokens``, knowbias its
  questions, ine its prompt batches and each masking trial's batches; random splits nothing and must still agree);
  every rank also writes the set it got (``<name>.rank<R>.json``);
- ``eval``: evaluation tasks through ``evaluate/runner.score_loaded`` (requests split by the sharded scorer);
- ``sweep``: ``bakeedit sweep`` itself (click, in this process), on the model saved in ``OUT/../tiny-model``
  (:func:`save_model`, by the test), with its stdout per rank (``sweep.rank<R>.out``).

Usage: ``python parallel_worker.py OUT`` (or :func:`main` in-process for the single-process run).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bakeedit import parallel
from bakeedit.evaluate.sharded import make_scorer
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import site_hooks
from bakeedit.neurons import Neuron, NeuronSet

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import CONFIGS, tiny_tokenizer

SITES = ("attn.v", "mlp.act")
DATA = Path(os.environ.get("BAKEEDIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
COUNTS: dict[str, int] = {}  # items this rank computed, for the test to see that the work was split


def build_model():
    config = copy.deepcopy(CONFIGS["llama"])
    config.max_position_embeddings = 512  # the chat-templated contrast prompts are ~150 byte tokens
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # whatever CONFIGS last held


def save_model(folder: Path) -> Path:
    """The worker's model and tokenizer as a checkpoint folder, for the commands that load one themselves."""
    build_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@contextmanager
def counting(cls: type, name: str, what: str):
    """Count this rank's calls of ``cls.name`` into ``COUNTS[what]`` (the work it did, to see that it was split)."""
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        COUNTS[what] = COUNTS.get(what, 0) + 1
        return original(self, *args, **kwargs)

    setattr(cls, name, counted)
    try:
        yield
    finally:
        setattr(cls, name, original)


def attribution(model, layout: ModelLayout, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``a * grad`` of ``log P(ids[-1] | ids[:-1])`` at the last prompt position, per (layer, site) channel."""
    prompt = ids[:-1]
    acts: dict[tuple[int, str], torch.Tensor] = {}
    zeros = {
        (layer, site): torch.zeros(1, len(prompt), layout.site_size(site), requires_grad=True)
        for layer in range(layout.n_layers) for site in SITES
    }

    def tap(address):
        def fn(act):
            acts[address] = act.detach()
            return act + zeros[address]

        return fn

    with site_hooks(model, layout, {a: tap(a) for a in zeros}):
        logits = model(prompt.unsqueeze(0), use_cache=False).logits
    logp = logits[0, -1].log_softmax(-1)[ids[-1]]
    grads = torch.autograd.grad(logp, list(zeros.values()))
    return {f"{layer}.{site}": (acts[(layer, site)][0, -1] * g[0, -1]).detach()
            for ((layer, site), g) in zip(zeros, grads, strict=True)}


def run_atp(model, out: Path) -> None:
    layout = ModelLayout.for_model(model)
    g = torch.Generator().manual_seed(7)
    items = [torch.randint(3, 250, (int(n),), generator=g) for n in torch.randint(4, 40, (11,), generator=g)]
    done = []
    results = parallel.map_items(lambda ids: attribution(model, layout, ids), items, on_item=lambda: done.append(1))
    COUNTS["atp"] = len(done)
    scores = {k: torch.stack([r[k] for r in results]).abs().mean(0) for k in results[0]}
    flat = [(float(v), key, i) for key, vec in scores.items() for i, v in enumerate(vec.tolist())]
    top = sorted(flat, key=lambda t: -t[0])[:12]
    neurons = [Neuron(layer=int(k.split(".", 1)[0]), site=k.split(".", 1)[1], index=i, score=s) for s, k, i in top]
    write(NeuronSet(method="atp-demo", params={"items": len(items)}, neurons=neurons), out / "atp.json")


class CountingProgress:
    """A stand-in for rich's Progress that counts the units each locate method reports done (on this rank)."""

    def __init__(self) -> None:
        self.done: dict[int, float] = {}

    def add_task(self, _description: str, total: float = 0) -> int:
        self.done[len(self.done)] = 0
        return len(self.done) - 1

    def advance(self, task: int, n: float = 1) -> None:
        self.done[task] += n

    def update(self, task: int, advance: float = 0, **_fields) -> None:
        self.done[task] += advance


def loaded_model(model, out: Path):
    from bakeedit.models.load import LoadedModel, ModelSource

    return LoadedModel(model, tiny_tokenizer(), ModelLayout.for_model(model),
                       ModelSource(ref="tiny", kind="local", path=out), torch.float32)


def run_method(model, out: Path, name: str, **params) -> None:
    """The registered locate method ``name`` (no item cache), as ``bakeedit locate`` runs it."""
    from bakeedit.locate import LocateContext, run_locate
    from bakeedit.recipe import LocateSpec

    progress = CountingProgress()
    neuron_set = run_locate(LocateSpec(method=name, **params), loaded_model(model, out),
                            LocateContext(cache_dir=None, progress=progress, base_dir=out))
    if progress.done:  # task 0: recording responses (coco), attributions (knowbias), value scores (ine)
        COUNTS[name] = progress.done[0]
    write(neuron_set, out / f"{name}.json")
    neuron_set.save(out / f"{name}.rank{parallel.ranks().rank}.json")  # what this rank got, to compare the ranks


def ine_data(out: Path) -> dict[str, str]:
    """Words, a template and probe sentences small enough for the tiny model: 7 prompts, 5 probe sentences, so
    that batches of 3 give both ranks value, query, bias and loss batches to score."""
    folder = out / "ine-data"
    with parallel.main_first() as main:
        if main:
            folder.mkdir()
            words = ["kind", "calm", "loud", "shy", "nurse", "pilot", "baker"]
            (folder / "words.jsonl").write_text("".join(
                json.dumps({"word": w, "category": "c", "split": "locate"}) + "\n" for w in words))
            (folder / "templates.json").write_text(json.dumps(
                [{"id": "t", "template": "A {word} said ", "categories": [], "female": "she", "male": "he"}]))
            (folder / "probe.txt").write_text("Rain fell on the hill.\nTwo and two are four.\nThe bus is late.\n"
                                              "Bread is baked.\nA cat sat.\n")
    # relative to the recipe folder (base_dir): the NeuronSet's params record them, equal in every run's folder
    return {"words": "ine-data/words.jsonl", "templates": "ine-data/templates.json",
            "probe_sentences": "ine-data/probe.txt"}


def run_ine(model, out: Path) -> None:
    """``ine`` with every step exercised: value and query scores, general neurons, causal masking in groups."""
    from bakeedit.locate.ine.causal import MaskProbe

    with counting(MaskProbe, "_bias_batch", "ine_bias"), counting(MaskProbe, "_loss_batch", "ine_loss"):
        run_method(model, out, "ine", **ine_data(out), k=4, candidates=6, group_size=2, loss_tolerance=0.05,
                   batch_size=3)


def run_sweep(out: Path) -> None:
    """``bakeedit sweep`` on the saved model: every lambda's evaluation split over the ranks, rank 0 writes."""
    from click.testing import CliRunner

    from bakeedit.cli import main as cli
    from bakeedit.evaluate.engine import Scorer

    recipe = out / "sweep.yaml"
    with parallel.main_first() as main:
        if main:
            recipe.write_text(
                f"name: sweep-2\nmodel: {out.parent / 'tiny-model'}\n"
                "neurons:\n  - {layer: 0, site: mlp.act, index: 3}\n  - {layer: 1, site: attn.v, index: 1}\n"
                f"evaluate: {{tasks: [crows_pairs, copa], limit: 6, data_dir: {DATA}}}\n")
    with counting(Scorer, "_forward", "sweep"):
        result = CliRunner().invoke(cli, ["sweep", str(recipe), "--lambda", "0,1,3", "-o", str(out / "sweep")])
    if result.exit_code != 0:
        raise RuntimeError(f"rank {parallel.ranks().rank}: bakeedit sweep failed:\n{result.output}")
    (out / f"sweep.rank{parallel.ranks().rank}.out").write_text(result.stdout)


def run_eval(model, out: Path) -> None:
    """Evaluation tasks of every scoring kind: sentence log-probs (crows_pairs), shared-context multiple choice
    (arc_easy), next-token letters and option log-likelihoods (bbq), greedy generation (gsm8k)."""
    from bakeedit.evaluate.engine import Scorer
    from bakeedit.evaluate.runner import load_tasks, score_loaded
    from bakeedit.evaluate.tasks.gsm8k import Gsm8k

    tasks, _ = load_tasks(["crows_pairs", "arc_easy", "bbq"], DATA, limit=10, seed=0)
    gsm8k = Gsm8k(num_fewshot=1, max_new_tokens=8)
    tasks.append((gsm8k, gsm8k.load(DATA, 5, 0)))
    forward = Scorer._forward
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    Scorer._forward = counted  # the forward passes this rank ran: split, yet summing to one process's
    try:
        results = score_loaded((model, tiny_tokenizer()), tasks, batch_size=4)
    finally:
        Scorer._forward = forward
    COUNTS["eval"] = len(calls)
    # Each scoring strategy on requests whose contexts repeat (shared) and whose lengths vary (padding).
    g = torch.Generator().manual_seed(3)
    words = ["the nurse", "a doctor", "he said", "she said", "they went home", "x" * 40]
    contexts = [" ".join(words[int(i)] for i in torch.randint(0, 6, (int(n),), generator=g))
                for n in torch.randint(1, 6, (7,), generator=g)]
    requests = [(c, " " + words[k]) for c in contexts for k in range(3)]
    strategies = {}
    for mode in ("packed", "kv", "flat"):
        scorer = make_scorer(model, tiny_tokenizer(), batch_size=4, mode=mode)
        strategies[mode] = [[r.logprob, r.is_greedy] for r in scorer.loglikelihood(requests)]
    strategies["generate"] = scorer.generate(contexts, 6)
    with parallel.main_first() as main:
        if main:
            (out / "eval.json").write_text(json.dumps([r.to_json() for r in results], indent=1))
            (out / "strategies.json").write_text(json.dumps(strategies))


def write(neuron_set: NeuronSet, path: Path) -> None:
    with parallel.main_first() as main:
        if main:
            neuron_set.save(path)


def main(target: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per process in every run: the arithmetic per item is then the same
    try:
        with parallel.distributed() as where:
            model = build_model()
            run_atp(model, target)
            run_method(model, target, "coco", categories=["gender", "religion"], max_items=5, batch_size=3,
                       sites=["attn.v", "mlp.act"], top_fraction=0.05, answer_format="chat")
            run_method(model, target, "knowbias", max_questions=5, steps=4, sites=["mlp.act", "attn.v"])
            run_ine(model, target)
            run_method(model, target, "random", reference="knowbias.json", seed=3)  # relative to base_dir
            run_eval(model, target)
            run_sweep(target)
            (target / f"rank{where.rank}-of-{where.world_size}.json").write_text(json.dumps(COUNTS))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
