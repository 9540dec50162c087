"""Shared fixtures. Tests run on CPU with tiny models built from configs and the real tokenizer/data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # ../shared beside the checkout (CI has it too)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Built-in models are cached in a per-session folder, not in the user's ~/.cache."""
    os.environ["CLMTUNE_HOME"] = str(tmp_path_factory.mktemp("clmtune_home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} not found")
    return SHARED
