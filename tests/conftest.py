"""Shared fixtures: tiny models of every architecture, a saved tiny checkpoint, the real SmolLM2, the data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach a hub; tests of the Hub client point HF_ENDPOINT at local servers and lift this themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tiny_models import ARCHS, save_tiny_checkpoint, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("BAKEEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return tiny_model(arch)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: ``tiny_checkpoint("llama")`` -> folder with a saved tiny model and tokenizer."""

    def make(arch_name: str = "llama", **kwargs) -> Path:
        return save_tiny_checkpoint(arch_name, tmp_path / f"base-{arch_name}", **kwargs)

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}: clone the repo with ../shared beside it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (converted once into the bakeedit cache)."""
    from bakeedit.models import load_model

    return load_model("embedded")
