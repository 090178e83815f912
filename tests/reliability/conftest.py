"""Fixtures of the reliability tests: a tiny base checkpoint saved once per module, and a fresh workspace per test
whose caches, $HOME and Hub settings never touch the user's."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_harness import Workspace, make_workspace, save_base


@pytest.fixture(scope="module")
def base_template(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("base-template") / "base")


@pytest.fixture
def ws(tmp_path, base_template, monkeypatch) -> Workspace:
    """A fresh workspace; caches and $HOME live in it or beside it, never in the user's."""
    workspace = make_workspace(tmp_path / "ws", base_template)
    monkeypatch.setenv("HOME", str(workspace.home))
    monkeypatch.setenv("BAKEEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))  # the card's heat map: no font cache in $HOME
    return workspace
