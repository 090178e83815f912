"""Fixtures for the Hub tests: a baked folder, a token, the push double and the olah mirror."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from baked_folders import add_evaluation, bake
from hub_clients import SERVER_LIFETIME_S, olah_server
from hub_double import HubDouble

from bakeedit.export.card import write_card
from bakeedit.workflows.apply_eval import record_evaluation


@pytest.fixture(scope="module")
def baked(tmp_path_factory) -> Path:
    """A verified tiny folder with an evaluation and its card (module-scoped: tests copy it before changing it).
    The evaluation is recorded in bakeedit.json as ``bakeedit eval`` records it, so the folder stays valid."""
    folder = bake(tmp_path_factory.mktemp("baked"), name="tiny-edit")
    record_evaluation(folder, folder / "eval", add_evaluation(folder))
    write_card(folder)
    return folder


@pytest.fixture
def token() -> str:
    return "hf_" + secrets.token_hex(16)


@pytest.fixture
def hub(tmp_path, token) -> Iterator[HubDouble]:
    """The push-side protocol double; the test fails if the client sent anything the double does not understand."""
    with HubDouble(tmp_path / "hub-storage", token, max_lifetime=SERVER_LIFETIME_S) as double:
        yield double
    assert double.rejected == [], "the client made requests the protocol double does not understand"


@pytest.fixture
def olah(tmp_path) -> Iterator[tuple[str, Path]]:
    """``(url, mirrors folder)``: olah in offline mode serving the git repositories under the mirrors folder."""
    mirrors, work = tmp_path / "mirrors", tmp_path / "olah"
    mirrors.mkdir()
    work.mkdir()
    with olah_server(mirrors, work) as url:
        yield url, mirrors
