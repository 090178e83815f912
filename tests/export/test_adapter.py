"""peft adapters (IA3, LoRA) of a linear plan: loaded with bare transformers + peft in a fresh process, they give
the runtime edit's logits, and ``merge_and_unload()`` gives the baked checkpoint's tensors.

One subprocess verifies every adapter of the module (4 architectures x 2 kinds, plus deliberately wrong adapters
that must fail); one more runs the end-to-end export of a LoadedModel.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bakeedit.edit import build_plan, fold_plan
from bakeedit.edit.plan import EditPlan
from bakeedit.errors import EditError, ManifestError, OutputExistsError, VerificationError
from bakeedit.export import adapter as adapter_mod
from bakeedit.export.adapter import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    build_adapter,
    export_adapter,
    save_adapter_files,
    write_adapter,
)
from bakeedit.export.adapter_record import check_adapter_folder, read_record
from bakeedit.export.verify_adapter import (
    IA3_BIAS_REASON,
    KNOWN_DIFFERENCE,
    AdapterCheck,
    AdapterVerification,
    merge_leg,
    verify_adapters,
)
from bakeedit.models.arch import SITES, ModelLayout
from bakeedit.models.load import LoadedModel, ModelSource
from bakeedit.neurons import Neuron
from bakeedit.recipe import EditSpec

from tiny_models import every_site_neurons, tiny_model, tiny_tokenizer

ARCHS = ("llama", "qwen2", "phi3", "gpt2")
KINDS = ("ia3", "lora")


@dataclass
class Case:
    arch: str
    model: torch.nn.Module
    layout: ModelLayout
    plan: EditPlan
    base: Path
    baked: Path
    folded: dict[str, torch.Tensor]


def distinct_lambdas(layout: ModelLayout) -> list[Neuron]:
    """``every_site_neurons`` (lambdas 0, 2.5, 1.37 on every site of every layer), with the third lambda made
    different per layer and site: an adapter that puts one module's vector on another must change the logits."""
    def distinct(n: Neuron) -> float:
        return 1.37 + 0.3 * n.layer + 0.15 * SITES.index(n.site)

    neurons = every_site_neurons(layout)
    return [n if n.lambda_ != 1.37 else n.model_copy(update={"lambda_": distinct(n)}) for n in neurons]


def _case(arch: str, root: Path) -> Case:
    model = tiny_model(arch)
    layout = ModelLayout.for_model(model)
    plan = build_plan(distinct_lambdas(layout), EditSpec(), layout)
    base, baked = root / f"base-{arch}", root / f"baked-{arch}"
    model.save_pretrained(base)
    folded = copy.deepcopy(model)  # bakeedit's fold on a copy: what merge_and_unload() must give
    fold_plan(folded, layout, plan)
    folded.save_pretrained(baked)
    return Case(arch, model, layout, plan, base, baked, {k: v.detach().clone() for k, v in folded.state_dict().items()})


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("adapter-cases")
    return {arch: _case(arch, root) for arch in ARCHS}


def _edit_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def _edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(values)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _without_offsets(layout: ModelLayout) -> ModelLayout:
    """A layout that forgets where a site starts inside a fused tensor (Phi-3's k, v, up)."""
    wrong = replace(layout, _channel_cache={})
    wrong.channels = lambda site, indices=None: torch.as_tensor(indices, dtype=torch.long)  # type: ignore[method-assign]
    return wrong


def _wrong_adapters(cases: dict[str, Case], root: Path) -> dict[str, tuple[Case, str, Path]]:
    """Adapters a plausible bug would write; each must fail verification."""
    out: dict[str, tuple[Case, str, Path]] = {}

    llama = cases["llama"]
    folder = root / "ia3-vector-on-the-wrong-module"
    save_adapter_files(build_adapter("ia3", llama.plan, llama.model, llama.layout), folder)
    gate, up = (f"{PREFIX}model.layers.0.mlp.{m}_proj.ia3_l" for m in ("gate", "up"))

    def swap(t: dict) -> None:
        t[gate], t[up] = t[up], t[gate]

    _edit_tensors(folder, swap)
    out[folder.name] = (llama, "ia3", folder)

    phi3 = cases["phi3"]
    for kind in KINDS:
        folder = root / f"{kind}-without-the-fused-offset"
        save_adapter_files(build_adapter(kind, phi3.plan, phi3.model, _without_offsets(phi3.layout)), folder)
        out[folder.name] = (phi3, kind, folder)

    qwen2 = cases["qwen2"]
    folder = root / "lora-without-the-biases"
    save_adapter_files(build_adapter("lora", qwen2.plan, qwen2.model, qwen2.layout), folder)
    _edit_tensors(folder, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".base_layer.bias")]])
    _edit_config(folder, bias="none")
    out[folder.name] = (qwen2, "lora", folder)

    gpt2 = cases["gpt2"]
    folder = root / "lora-conv1d-not-transposed"
    weights = build_adapter("lora", gpt2.plan, gpt2.model, gpt2.layout)
    save_adapter_files(weights, folder)
    name = "transformer.h.0.attn.c_proj"  # [32, 32]: the untransposed weight has the right shape, wrong values
    target = next(t for t in weights.summary.targets if t.module == name)
    stored = gpt2.model.get_submodule(name).weight.detach()  # Conv1D: [in, out]

    def untransposed(t: dict) -> None:
        b = t[f"{PREFIX}{name}.lora_B.weight"]
        b[:, : len(target.channels)] = stored[:, target.channels]

    _edit_tensors(folder, untransposed)
    out[folder.name] = (gpt2, "lora", folder)
    return out


@pytest.fixture(scope="module")
def verified(cases, tmp_path_factory):
    """Every adapter written and verified in one fresh process: ``{(arch, kind) or name: (folder, verification)}``."""
    root = tmp_path_factory.mktemp("adapters")
    entries: dict = {}
    for arch, case in cases.items():
        for kind in KINDS:
            export = write_adapter(kind, case.plan, case.model, case.layout, root / f"{arch}-{kind}",
                                   base_folder=case.base, base_model_id=f"bakeedit-tests/tiny-{arch}", verify=False)
            entries[(arch, kind)] = (case, kind, export.folder)
    entries.update(_wrong_adapters(cases, root / "wrong"))
    checks = [AdapterCheck(adapter=folder, base_folder=case.base, model=case.model, layout=case.layout,
                           plan=case.plan, kind=kind, baked_folder=case.baked)
              for case, kind, folder in entries.values()]
    results = verify_adapters(checks, timeout_s=600)
    return {key: (folder, result) for (key, (_, _, folder)), result in zip(entries.items(), results, strict=True)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_round_trips_in_a_fresh_process(verified, cases, arch, kind):
    _, v = verified[(arch, kind)]
    assert v.passed, v.failures()
    assert v.error is None and v.bakeedit_imported == [] and v.peft_class == "PeftModelForCausalLM"
    assert v.edit_effect > 1e-3, "the edit must change the logits, or the comparison proves nothing"
    assert v.max_abs_logit_delta <= 1e-4 and v.tolerance == 1e-4 and v.dtype == "float32"
    assert v.keys == "passed" and v.key_problems == []
    # merge_and_unload() equals bakeedit's fold, saved: IA3's merge is the fold's own product, LoRA's one rounding
    assert v.merge == "passed" and v.merge_reference == "baked checkpoint" and v.merge_mismatched == []
    assert v.merge_compared + len(v.merge_not_compared) == len(cases[arch].folded)
    assert v.merge_not_compared in ([], ["lm_head.weight"])  # a tied head save_pretrained leaves out
    if kind == "ia3":
        assert v.max_abs_logit_delta == 0.0 and v.merge_bit_exact == v.merge_compared
    else:
        assert v.merge_max_abs_diff <= 1e-6


@pytest.mark.parametrize("name", ["ia3-vector-on-the-wrong-module", "ia3-without-the-fused-offset",
                                  "lora-without-the-fused-offset", "lora-without-the-biases",
                                  "lora-conv1d-not-transposed"])
def test_a_wrong_adapter_fails_verification(verified, name):
    _, v = verified[name]
    assert not v.passed
    assert not v.within_tolerance and v.max_abs_logit_delta > 10 * v.tolerance
    assert v.merge == "failed" and v.merge_mismatched
    assert any("differ" in reason for reason in v.failures())


def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_FILE).read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_targets_the_edited_modules_with_feedforward_inputs(verified, cases, arch):
    case = cases[arch]
    folder, _ = verified[(arch, "ia3")]
    config = _config(folder)
    layout = case.layout
    names = {s: {layout.module_name(layer, s) for layer in range(layout.n_layers)} for s in layout.sites}
    inputs = set().union(*(names[s] for s in layout.sites if layout.site_map(s).axis == "in"))
    assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM"
    assert set(config["target_modules"]) == set().union(*names.values())
    assert config["target_modules"] == sorted(config["target_modules"])  # the same bytes on every run
    assert set(config["feedforward_modules"]) == inputs  # o_proj / down_proj (GPT-2: c_proj) inputs
    assert config["fan_in_fan_out"] is (arch == "gpt2")  # Conv1D stores [in, out]
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for layer in range(layout.n_layers):
        for site in layout.sites:
            module = layout.module_name(layer, site)
            vector = tensors[f"{PREFIX}{module}.ia3_l"]
            assert vector.shape[0 if site in ("attn.o_in", "mlp.act") else 1] == 1
            group = next(g for g in case.plan.groups if (g.layer, g.site) == (layer, site))
            channels = layout.channels(site, group.indices)  # fused: the site's offset in the module's output
            assert vector.flatten()[channels].tolist() == pytest.approx(group.lambdas)
    # 1 everywhere else: each fused vector holds exactly its sites' edited channels
    edited = sum(len(g.indices) for g in case.plan.groups)
    assert sum(int((t != 1).sum()) for t in tensors.values()) == edited


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_rows_columns_rank_and_bias(verified, cases, arch):
    case = cases[arch]
    folder, _ = verified[(arch, "lora")]
    config = _config(folder)
    layout = case.layout
    rank = max(3 * sum(1 for s in layout.sites if layout.module_name(0, s) == layout.module_name(0, site))
               for site in layout.sites)
    assert config["r"] == config["lora_alpha"] == rank  # scale 1; Phi-3 qkv_proj / GPT-2 c_attn: 9 channels
    assert config["rank_pattern"] == {} and config["use_rslora"] is False and config["lora_dropout"] == 0.0
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    has_bias = arch in ("qwen2", "gpt2")
    assert config["bias"] == ("lora_only" if has_bias else "none")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for site in layout.sites:
        module = layout.module_name(1, site)
        a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == rank
        delta = b @ a  # [out, in]
        size = layout.site_size(site)
        channels = layout.channels(site, [0, size // 2, size - 1])
        touched = (delta != 0).any(dim=1 if layout.site_map(site).axis == "out" else 0)
        assert set(channels.tolist()) <= set(touched.nonzero().flatten().tolist())  # the fused offset is applied
    biases = sorted(k for k in tensors if k.endswith(".base_layer.bias"))
    if arch == "qwen2":  # the q/k/v biases, scaled like the fold scales them
        assert [k.split(".")[-3] for k in biases] == ["k_proj", "q_proj", "v_proj"] * 3
        for key in biases:
            assert torch.equal(tensors[key], case.folded[key.removeprefix(PREFIX).replace(".base_layer", "")])
    assert bool(biases) is has_bias


def test_qwen2_ia3_merge_scales_the_qkv_biases(verified, cases):
    """peft's IA3 merge scales a non-feedforward target's bias (since peft 0.6); the adapter does at run time.
    Checked here directly, bias by bias, since the merge leg reports only tensors that differ."""
    from peft import PeftModel

    case = cases["qwen2"]
    folder, _ = verified[("qwen2", "ia3")]
    base = tiny_model("qwen2")
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload().state_dict()
    original = case.model.state_dict()
    for layer in range(case.layout.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.bias"
            assert torch.equal(merged[name], case.folded[name])
            assert not torch.equal(merged[name], original[name])


def test_an_ia3_bias_left_unscaled_by_the_merge_is_a_known_difference(verified, cases):
    """What peft < 0.6 did (huggingface/peft#972): the bias of a non-feedforward target stays the base's on merge."""
    case = cases["qwen2"]
    folder, _ = verified[("qwen2", "ia3")]
    check = AdapterCheck(adapter=folder, base_folder=case.base, model=case.model, layout=case.layout,
                         plan=case.plan, kind="ia3", baked_folder=case.baked)
    bias = {"name": "model.layers.0.self_attn.q_proj.bias", "max_abs_diff": 0.7, "close": False,
            "equal_to_base": True}
    report = {"compared": 39, "bit_exact": 38, "max_abs_diff": 0.7, "rtol": 1e-6, "differing": [bias],
              "missing": [], "not_compared": []}
    leg = merge_leg(check, report)
    assert leg["merge"] == KNOWN_DIFFERENCE and leg["merge_mismatched"] == []
    assert [(d.name, d.reason) for d in leg["merge_known_differences"]] == [(bias["name"], IA3_BIAS_REASON)]
    # the same difference on a feedforward target, a weight, or a LoRA adapter is a failure
    for changed_check, changed in ((check, {**bias, "name": "model.layers.0.mlp.down_proj.bias"}),
                                   (check, {**bias, "name": "model.layers.0.self_attn.q_proj.weight"}),
                                   (replace(check, kind="lora"), bias),
                                   (check, {**bias, "equal_to_base": False})):
        assert merge_leg(changed_check, {**report, "differing": [changed]})["merge"] == "failed"


@pytest.fixture
def loaded_qwen2(cases, tmp_path) -> LoadedModel:
    case = cases["qwen2"]
    source = ModelSource(ref=str(case.base), kind="local", path=case.base, base_model="bakeedit-tests/tiny-qwen2")
    return LoadedModel(model=case.model, tokenizer=tiny_tokenizer(), layout=case.layout, source=source,
                       dtype=torch.float32)


def test_export_writes_a_verified_adapter_folder(cases, loaded_qwen2, tmp_path):
    """End to end for a LoadedModel: the folder is verified before it is put in place (here against the base
    checkpoint plus bakeedit's fold of the edited tensors), and carries the card and the hashed record."""
    from huggingface_hub import ModelCard

    case = cases["qwen2"]
    out = tmp_path / "adapter"
    export = export_adapter("lora", case.plan, loaded_qwen2, out, timeout_s=600)
    assert export.files == ("README.md", CONFIG_FILE, WEIGHTS_FILE, "bakeedit.json")
    assert sorted(p.name for p in out.iterdir()) == sorted(export.files)  # no staging leftovers
    v = export.verification
    assert v.passed and v.merge == "passed" and v.merge_reference.startswith("base checkpoint with bakeedit's fold")
    assert v.n_tokens > 20  # the tokenizer's probe prompts, not random ids
    assert _config(out)["base_model_name_or_path"] == "bakeedit-tests/tiny-qwen2"

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "bakeedit-tests/tiny-qwen2"
    assert card.data.base_model_relation == "adapter" and "lora" in card.data.tags
    assert "| 0 | attn.q | 0 | 0 |" in card.text and "**passed**" in card.text

    record = check_adapter_folder(out)  # every file hashed, digest matches
    assert record.verification == v and record.plan == case.plan and record.edit_form == "adapter"
    assert set(record.files_sha256) == {"README.md", CONFIG_FILE, WEIGHTS_FILE}
    assert record.adapter.bias == "lora_only" and record.base_model.hub_id == "bakeedit-tests/tiny-qwen2"
    assert not Path(record.base_model.ref).is_absolute()  # relative to the adapter folder, like provenance
    assert read_record(out).adapter.targets[0].module == "model.layers.0.self_attn.q_proj"

    with pytest.raises(OutputExistsError):
        export_adapter("ia3", case.plan, loaded_qwen2, out, verify=False)
    export_adapter("ia3", case.plan, loaded_qwen2, out, verify=False, overwrite=True)  # ours: may be replaced
    assert _config(out)["peft_type"] == "IA3" and read_record(out).verification is None

    (out / "README.md").write_text("hand edit\n")
    with pytest.raises(ManifestError, match=r"README\.md"):
        check_adapter_folder(out)


def test_a_failed_verification_leaves_nothing(cases, tmp_path, monkeypatch):
    case = cases["llama"]
    failed = AdapterVerification(kind="ia3", dtype="float32", n_tokens=1, max_abs_logit_delta=1.0,
                                 mean_abs_logit_delta=1.0, max_abs_logit=1.0, tolerance=1e-4, within_tolerance=False,
                                 edit_effect=1.0, power="failed", passed=False)
    monkeypatch.setattr(adapter_mod, "verify_adapter", lambda check, timeout_s=None: failed)
    out = tmp_path / "adapter"
    with pytest.raises(VerificationError, match="does not reproduce the runtime edit"):
        write_adapter("ia3", case.plan, case.model, case.layout, out, base_folder=case.base)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # no staging folder left


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("edit", [
    {"type": "nonlinear", "map": "tanh_gain", "params": {"alpha": 0.5, "s": 0.5}},
    {"lambda": 2.0, "positions": "last"},
], ids=["nonlinear", "position-scoped"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_plan_no_adapter_can_carry_is_refused(cases, tmp_path, edit, kind):
    case = cases["llama"]
    plan = build_plan([Neuron(layer=1, site="mlp.act", index=3)], EditSpec.model_validate(edit), case.layout)
    out = tmp_path / "adapter"
    with pytest.raises(EditError) as exc:
        write_adapter(kind, plan, case.model, case.layout, out, base_folder=case.base)
    message = _one_line(exc)
    assert "cannot carry this plan" in message and "layer 1 mlp.act" in message
    assert "custom-module checkpoint" in exc.value.hint
    assert not out.exists()


def test_routed_experts_and_identity_plans_are_refused(cases, tmp_path):
    moe = tiny_model("qwen2_moe")
    layout = ModelLayout.for_model(moe)
    plan = build_plan([Neuron(layer=0, site="mlp.experts.1.up", index=2)], EditSpec(), layout)
    with pytest.raises(EditError) as exc:
        build_adapter("lora", plan, moe, layout)
    assert "routed expert" in _one_line(exc)
    shared = build_plan([Neuron(layer=0, site="mlp.shared.act", index=2)], EditSpec(), layout)
    target = build_adapter("ia3", shared, moe, layout).summary.targets[0]
    assert (target.module, target.mode) == ("model.layers.0.mlp.shared_expert.down_proj", "input")

    case = cases["llama"]
    identity = build_plan([Neuron(layer=0, site="attn.q", index=1, **{"lambda": 1.0})], EditSpec(), case.layout)
    with pytest.raises(EditError) as exc:
        build_adapter("ia3", identity, case.model, case.layout)
    assert "changes no channel" in _one_line(exc)
    with pytest.raises(EditError, match="unknown adapter kind"):
        build_adapter("prefix", case.plan, case.model, case.layout)  # type: ignore[arg-type]
