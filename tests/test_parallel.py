"""Data-parallel locate runs give the single-process result; models spread by accelerate keep every hook working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import parallel_worker
import pytest
import torch
from transformers import AutoModelForCausalLM

from bakeedit import parallel
from bakeedit.edit import build_plan, runtime_edit
from bakeedit.errors import BakeeditError
from bakeedit.models.arch import ModelLayout
from bakeedit.models.hookpoints import capture_sites
from bakeedit.models.load import load_model
from bakeedit.models.reference import ModelSpec
from bakeedit.neurons import Neuron
from bakeedit.parallel import Ranks
from bakeedit.recipe import EditSpec

from tiny_models import probe_ids

WORKER = Path(__file__).parent / "parallel_worker.py"
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_partition_the_items_and_gather_restores_their_order(world):
    items = list(range(13))
    shares = [parallel.shard(items, Ranks(r, world)) for r in range(world)]
    assert sorted(x for s in shares for x in s) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    merged: list[int] = [None] * len(items)  # what gather() does with the all-gathered parts
    for rank, part in enumerate(shares):
        merged[rank::world] = part
    assert merged == items


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n_items", [1, 7, 12])
def test_shard_batches_rebuilds_the_single_process_batches(world, n_items):
    lengths = [(i * 7) % 5 for i in range(n_items)]  # ties in the sort key, as real token lengths have
    items = [f"item{i}" for i in range(n_items)]
    key = dict(zip(items, lengths, strict=True)).__getitem__

    def batches_of(share: list[str]) -> list[list[str]]:  # what record_last_tokens does with its items
        ordered = sorted(share, key=key)
        return [ordered[i : i + 3] for i in range(0, len(ordered), 3)]

    single = batches_of(items)
    per_rank = [batches_of(parallel.shard_batches(items, 3, key, Ranks(r, world))) for r in range(world)]
    assert sorted(b for r in per_rank for b in r) == sorted(single)


def test_a_plain_run_is_rank_0_of_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with parallel.distributed() as where:
        assert where == Ranks(0, 1, 0) and parallel.is_main()
        assert parallel.map_items(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
        assert parallel.gather_mapping({"a": 1}) == {"a": 1}
        assert parallel.gather_objects("x") == ["x"] and parallel.from_main({"n": 2}) == {"n": 2}
        with parallel.main_first() as main:
            assert main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parallel.env_ranks() == Ranks(3, 4, 1)
    assert parallel.ranks() == Ranks(), "without a process group, items must never be split"


def test_the_process_group_waits_hours_for_rank_0_unless_told_otherwise(monkeypatch):
    """Ranks wait at a collective while rank 0 bakes a large model: torch's 30 minutes would abort them."""
    from datetime import timedelta

    monkeypatch.delenv(parallel.TIMEOUT_ENV, raising=False)
    assert parallel._timeout() == timedelta(hours=6)
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "90")
    assert parallel._timeout() == timedelta(seconds=90)
    for bad in ("soon", "0", "-5", "inf"):
        monkeypatch.setenv(parallel.TIMEOUT_ENV, bad)
        with pytest.raises(BakeeditError, match=rf"\$BAKEEDIT_DIST_TIMEOUT: '{bad}' is not a number of seconds"):
            parallel._timeout()


def test_two_gloo_processes_find_the_same_neurons_as_one(tmp_path, shared_data):
    """torchrun --nproc-per-node 2 on CPU (gloo): attribution patching and every locate method (coco, knowbias,
    ine, random) give byte-identical NeuronSets on both ranks, evaluation tasks of every scoring kind and a
    ``bakeedit sweep`` give identical results, with the work split."""
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    parallel_worker.save_model(tmp_path / "tiny-model")  # for bakeedit sweep, which loads a folder
    parallel_worker.COUNTS.clear()
    parallel_worker.main(single)  # in this process: rank 0 of 1
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(WORKER), str(double)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BAKEEDIT_SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]

    for name in ("atp", "coco", "knowbias", "ine", "random"):
        a, b = json.loads((single / f"{name}.json").read_text()), json.loads((double / f"{name}.json").read_text())
        assert a["neurons"], f"{name}: an empty NeuronSet proves nothing"
        assert a == b, name
        if name != "atp":  # every rank holds the gathered result, not only the one that writes it
            assert all(json.loads((double / f"{name}.rank{r}.json").read_text()) == a for r in range(2)), name
    assert json.loads((single / "random.json").read_text())["neurons"] != json.loads(
        (single / "knowbias.json").read_text())["neurons"]
    evals = [json.loads((folder / "eval.json").read_text()) for folder in (single, double)]
    assert [r["task"] for r in evals[0]] == ["crows_pairs", "arc_easy", "bbq", "gsm8k"]
    assert all(r["n"] > 0 for r in evals[0])
    assert evals[0] == evals[1]
    strategies = [json.loads((folder / "strategies.json").read_text()) for folder in (single, double)]
    assert strategies[0] == strategies[1] and len(strategies[0]["kv"]) == 21
    sweeps = [(folder / "sweep") for folder in (single, double)]
    for name in ("sweep.json", "eval/results.json"):
        one, two_ = (_without_run_facts(json.loads((s / name).read_text())) for s in sweeps)
        assert one == two_, name
    assert (double / "sweep.rank0.out").read_text().strip() == str(sweeps[1] / "sweep.md")
    assert (double / "sweep.rank1.out").read_text() == "", "only rank 0 reports"
    counts = [json.loads((double / f"rank{r}-of-2.json").read_text()) for r in range(2)]
    whole = json.loads((single / "rank0-of-1.json").read_text())
    for what in ("atp", "coco", "knowbias", "ine", "ine_bias", "ine_loss", "eval", "sweep"):
        assert all(c[what] > 0 for c in counts), f"{what}: one rank did all the work"
        assert sum(c[what] for c in counts) == whole[what], what


def _without_run_facts(record: dict) -> dict:
    """A results.json or sweep.json without what differs between two runs of the same work (when, how long, the
    recipe's path)."""
    return {k: v for k, v in record.items() if k not in ("created_at", "timings_s", "recipe")}


def test_device_map_auto_on_cpu(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2")
    spread = load_model(ModelSpec(id=str(folder), device_map="auto"))
    plain = load_model(ModelSpec(id=str(folder)))
    plan = build_plan([Neuron(layer=1, site="attn.q", index=4, **{"lambda": 0.0})], EditSpec(), plain.layout)
    ids = probe_ids()
    with torch.no_grad():
        assert torch.equal(spread.model(ids).logits, plain.model(ids).logits)
        with runtime_edit(spread.model, spread.layout, plan):
            edited = spread.model(ids).logits
        with runtime_edit(plain.model, plain.layout, plan):
            assert torch.equal(edited, plain.model(ids).logits)


def test_hooks_on_a_model_offloaded_to_disk(tiny_checkpoint, tmp_path):
    """accelerate's offload wraps every module's forward; site hooks must still see and change the activations."""
    folder = tiny_checkpoint("llama")
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=tmp_path / "offload"
    ).eval()
    assert "disk" in offloaded.hf_device_map.values()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    layout = ModelLayout.for_model(plain)
    addresses = [(layer, site) for layer in range(layout.n_layers) for site in layout.sites]
    plan = build_plan([Neuron(layer=a[0], site=a[1], index=2, **{"lambda": 0.5}) for a in addresses], EditSpec(),
                      layout)
    ids = probe_ids()
    with torch.no_grad():
        with capture_sites(offloaded, layout, addresses) as got, capture_sites(plain, layout, addresses) as want:
            offloaded(ids)
            plain(ids)
        assert all(torch.equal(got[a], want[a]) for a in addresses)
        with runtime_edit(offloaded, layout, plan), runtime_edit(plain, layout, plan):
            assert torch.equal(offloaded(ids).logits, plain(ids).logits)
            assert not torch.equal(plain(ids).logits, AutoModelForCausalLM.from_pretrained(folder)(ids).logits)


COCO = ("{method: coco, categories: [gender, religion], max_items: 5, batch_size: 3, sites: [attn.v, mlp.act], "
        "top_fraction: 0.05, report: report.json}")


def torchrun_bakeedit(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 bakeedit ARGS`` (gloo on CPU), one thread per process."""
    bakeedit = shutil.which("bakeedit") or str(Path(sys.executable).parent / "bakeedit")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           bakeedit, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_torchrun_bakeedit_locate_and_eval(tmp_path, shared_data):
    """The commands themselves under ``torchrun --nproc-per-node 2`` (gloo): rank 0 writes the single-process
    NeuronSet and evaluation results."""
    from click.testing import CliRunner

    from bakeedit.cli import main as cli

    folder = tmp_path / "tiny"
    parallel_worker.build_model().save_pretrained(folder)
    parallel_worker.tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "recipe.yaml").write_text(f"name: tiny-coco\nmodel: {{id: {folder}}}\nlocate: {COCO}\n")
    evaluate = ["eval", str(folder), "--tasks", "crows_pairs,arc_easy", "--limit", "8", "--data-dir", str(shared_data)]
    runs = {
        "locate": lambda n: ["locate", str(tmp_path / "recipe.yaml"), "--cache-dir", str(tmp_path / f"cache-{n}"),
                             "-o"],  # a cache each: the second run must compute, not read the first's
        "eval": lambda _n: [*evaluate, "-o"],
    }
    for name, args in runs.items():
        one = CliRunner().invoke(cli, [*args(1), str(tmp_path / f"{name}-1")], catch_exceptions=False)
        assert one.exit_code == 0, one.output
        two = torchrun_bakeedit([*args(2), str(tmp_path / f"{name}-2")], tmp_path)
        assert two.returncode == 0, two.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"locate-{n}").read_text()) for n in (1, 2))
    assert one["neurons"] and one == two
    one, two = (json.loads((tmp_path / f"eval-{n}" / "results.json").read_text()) for n in (1, 2))
    for run in (one, two):
        del run["created_at"], run["timings_s"]
    assert one == two


def test_torchrun_bakeedit_apply_writes_the_single_process_folder(tmp_path, shared_data):
    """``bakeedit apply`` under ``torchrun --nproc-per-node 2``: the locate step, the base and control evaluations
    and the baked checkpoint's evaluation are split over the ranks (rank 1 loads rank 0's verified staged folder);
    rank 0 alone writes, and its one folder has one process's weights, neurons, control and evaluation."""
    from click.testing import CliRunner

    from bakeedit.cli import main as cli

    model = parallel_worker.save_model(tmp_path / "tiny")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: tiny-apply\nmodel: {{id: {model}}}\nlocate: {COCO}\nedit: {{lambda: 0.0}}\n"
                      f"evaluate: {{tasks: [crows_pairs], limit: 6, data_dir: {shared_data}}}\n")
    outs = {n: tmp_path / f"apply-{n}" for n in (1, 2)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same arithmetic per batch
    try:
        one = CliRunner().invoke(cli, ["apply", str(recipe), "-o", str(outs[1])], catch_exceptions=False,
                                 env={"BAKEEDIT_CACHE": str(tmp_path / "cache-1")})
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    two = torchrun_bakeedit(["apply", str(recipe), "-o", str(outs[2])], tmp_path,
                            BAKEEDIT_CACHE=str(tmp_path / "cache-2"))  # its own cache: it locates, split
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.splitlines() == [str(outs[2])], "rank 0 alone prints the folder"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "a temporary was left"

    files = [sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) for out in outs.values()]
    assert files[0] == files[1]
    weights = [f for f in files[0] if f.endswith(".safetensors")]
    assert weights and all((outs[1] / f).read_bytes() == (outs[2] / f).read_bytes() for f in weights)
    for name in ("neurons.json", "neurons-random.json"):
        one_, two_ = (json.loads((out / name).read_text()) for out in outs.values())
        assert one_["neurons"] and one_ == two_, name
    one_, two_ = (_without_run_facts(json.loads((out / "eval" / "results.json").read_text())) for out in outs.values())
    assert {row["model"] for row in one_["rows"]} == {"base", "control", "edited"}
    assert one_ == two_
