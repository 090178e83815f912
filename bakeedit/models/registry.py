"""The architecture registry: one data file per family, read into :class:`ArchSpec`, and name inference.

mergekit keeps its architectures as JSON files; we do the same. A family file names its ``model_types`` and either
a ``pattern`` (a shared table under ``architectures/patterns/``, e.g. ``llama-like``) or its own ``blocks`` and
``sites``. Adding a dense family that follows a known pattern is one small JSON file and no Python (docs/
architecture.md, "Adding a family"). A model whose ``model_type`` no file names is not refused outright: if its
module names match a pattern (as mergekit falls back to name inference), the error offers that pattern as a guess
to pass explicitly (``model.arch: llama-like`` in the recipe), and :func:`spec_for` builds the spec from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from functools import cache
from importlib import resources
from typing import Any

from bakeedit.errors import UnsupportedArchitecture
from bakeedit.models.spec import DIMS, EXPERT_PARTS, SHARED_SITES, SITES, ArchSpec, ConfigKeys, SiteMap

PACKAGE = "bakeedit.models"
FOLDER = "architectures"
_FAMILY_KEYS = {"name", "model_types", "pattern", "blocks", "sites", "experts", "notes", "transposed_weights",
                "config_keys", "facts", "description"}
_SITE_KEYS = {"module", "axis", "size", "offset", "interleave", "param", "stored"}


def _fail(source: str, message: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(f"{source}: {message}", hint="the file format is in docs/architecture.md")


def _site_map(source: str, site: str, raw: Any) -> SiteMap:
    if site not in SITES and site not in SHARED_SITES:
        raise _fail(source, f"sites: unknown site '{site}' (allowed: {', '.join(SITES + SHARED_SITES)})")
    if not isinstance(raw, dict) or not {"module", "axis", "size"} <= set(raw) or set(raw) - _SITE_KEYS:
        raise _fail(source, f"sites.{site}: give module, axis, size (and optionally offset, interleave)")
    if raw["axis"] not in ("out", "in") or raw["size"] not in DIMS:
        raise _fail(source, f"sites.{site}: axis must be out|in and size one of {', '.join(DIMS)}")
    offset = tuple(raw.get("offset", ()))
    if any(d not in DIMS for d in offset):
        raise _fail(source, f"sites.{site}.offset: each entry must be one of {', '.join(DIMS)}")
    return SiteMap(raw["module"], raw["axis"], raw["size"], offset, raw.get("interleave"), raw.get("param"),
                   raw.get("stored"))


def _expert_sites(source: str, raw: Any) -> dict[str, SiteMap]:
    """``experts: {module, parts: {gate|up|act: {param, axis, offset?, stored}}}`` of a MoE family."""
    if not isinstance(raw, dict) or set(raw) != {"module", "parts"} or not isinstance(raw["parts"], dict):
        raise _fail(source, "experts: give 'module' (the experts module) and 'parts' (gate, up, act)")
    out = {}
    for part, value in raw["parts"].items():
        if part not in EXPERT_PARTS:
            raise _fail(source, f"experts.parts: unknown part '{part}' (allowed: {', '.join(EXPERT_PARTS)})")
        if not isinstance(value, dict) or not {"param", "axis", "stored"} <= set(value):
            raise _fail(source, f"experts.parts.{part}: give param, axis and stored")
        if "{expert}" not in value["stored"]:
            raise _fail(source, f"experts.parts.{part}.stored: the name must contain {{expert}}")
        smap = _site_map(source, "mlp.shared." + part,
                         {"module": raw["module"], "size": "expert_ffn", **value})
        out[part] = smap
    return out


def _read(relative: str) -> dict[str, Any]:
    text = resources.files(PACKAGE).joinpath(FOLDER, relative).read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"{FOLDER}/{relative}", f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or set(raw) - _FAMILY_KEYS or "name" not in raw:
        unknown = sorted(set(raw) - _FAMILY_KEYS) if isinstance(raw, dict) else []
        raise _fail(f"{FOLDER}/{relative}", f"a JSON object with 'name' and known keys (unknown: {unknown})")
    return raw


def _build(raw: dict[str, Any], source: str, base: ArchSpec | None) -> ArchSpec:
    if base is None and ("blocks" not in raw or "sites" not in raw):
        raise _fail(source, "a family without a 'pattern' needs its own 'blocks' and 'sites'")
    sites = dict(base.sites) if base is not None else {}
    sites.update({site: _site_map(source, site, value) for site, value in raw.get("sites", {}).items()})
    experts = _expert_sites(source, raw["experts"]) if "experts" in raw else {}
    keys = {**(vars(base.config_keys) if base is not None else {}), **raw.get("config_keys", {})}
    try:
        config_keys = ConfigKeys(**keys)
    except TypeError as exc:
        raise _fail(source, f"config_keys: {exc}") from None
    return ArchSpec(
        name=raw["name"],
        model_types=tuple(raw.get("model_types", ())),
        blocks=raw.get("blocks", base.blocks if base is not None else ""),
        sites={site: sites[site] for site in SITES + SHARED_SITES if site in sites},
        notes=raw.get("notes", ""),
        expert_sites=experts,
        transposed_weights=bool(raw.get("transposed_weights", base.transposed_weights if base else False)),
        config_keys=config_keys,
        facts={**(base.facts if base is not None else {}), **raw.get("facts", {})},
        pattern=base.name if base is not None else None,
        source=source,
    )


def _names(sub: str) -> list[str]:
    folder = resources.files(PACKAGE).joinpath(FOLDER, sub) if sub else resources.files(PACKAGE).joinpath(FOLDER)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))


@cache
def patterns() -> dict[str, ArchSpec]:
    """The shared tables (``architectures/patterns/*.json``) by name."""
    out = {}
    for name in _names("patterns"):
        raw = _read(f"patterns/{name}")
        out[raw["name"]] = _build(raw, f"{FOLDER}/patterns/{name}", None)
    return out


@cache
def families() -> tuple[ArchSpec, ...]:
    """Every family file (``architectures/*.json``), in file-name order; a model type belongs to one family."""
    out: list[ArchSpec] = []
    seen: dict[str, str] = {}
    for name in _names(""):
        source = f"{FOLDER}/{name}"
        raw = _read(name)
        base = None
        if "pattern" in raw:
            base = patterns().get(raw["pattern"])
            if base is None:
                raise _fail(source, f"pattern '{raw['pattern']}' does not exist (have: {', '.join(patterns())})")
        spec = _build(raw, source, base)
        if not spec.model_types:
            raise _fail(source, "model_types: name at least one config.model_type")
        for model_type in spec.model_types:
            if model_type in seen:
                raise _fail(source, f"model type '{model_type}' is already claimed by {seen[model_type]}")
            seen[model_type] = source
        out.append(spec)
    return tuple(out)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` bakeedit can edit without a guess."""
    return sorted(t for spec in families() for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in families():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitecture(
        f"unsupported architecture '{model_type}'",
        hint="supported model types: " + ", ".join(supported_model_types())
        + f"; a model that follows a known layout can name it (model.arch: {' | '.join(arch_names())})",
    )


def arch_names() -> list[str]:
    """What ``model.arch`` accepts: the patterns, then every family name."""
    return [*patterns(), *(spec.name for spec in families())]


def spec_by_name(name: str, model_type: str) -> ArchSpec:
    """The table named ``name`` (a pattern or a family), applied to a model of ``model_type``."""
    table = patterns().get(name) or next((s for s in families() if s.name == name), None)
    if table is None:
        raise UnsupportedArchitecture(f"model.arch: unknown architecture '{name}'",
                                      hint="known: " + ", ".join(arch_names()))
    return replace(table, model_types=(model_type,))


def matching_tables(module_names: Iterable[str]) -> list[str]:
    """Names of the tables (patterns first, then families) whose block path and every site module exist in a
    model with these module names: what an unknown ``model_type`` is offered as a guess."""
    names = set(module_names)
    found = []
    for spec in [*patterns().values(), *families()]:
        first = f"{spec.blocks}.0"
        if first in names and all(f"{first}.{smap.module}" in names for smap in spec.sites.values()):
            found.append(spec.name)
    return found


def spec_for(model_type: str, arch: str | None = None, module_names: Iterable[str] | None = None) -> ArchSpec:
    """The spec for a model: the named table when ``arch`` is given, else the family of ``model_type``; an unknown
    type whose modules match a table is refused with that table offered as the guess to pass."""
    if arch is not None:
        return spec_by_name(arch, model_type)
    try:
        return spec_for_model_type(model_type)
    except UnsupportedArchitecture as exc:
        guesses = matching_tables(module_names or ())
        if guesses:
            raise UnsupportedArchitecture(
                f"unsupported architecture '{model_type}', but its modules match the {guesses[0]} layout",
                hint=f"if it is {guesses[0]}, say so: `model: {{id: ..., arch: {guesses[0]}}}` in the recipe "
                     "(and check the result with `bakeedit verify`); or add a family file (docs/architecture.md)",
            ) from None
        raise exc from None
