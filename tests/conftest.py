"""Shared fixtures. Tests needing ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("LORA_JAX_SHARED", ROOT.parent / "shared"))
MINILM_L3 = SHARED / "models" / "paraphrase-MiniLM-L3-v2"
DATA_DIR = SHARED / "data"


def require_shared(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the offline ../shared folder is not beside this clone)")
    return path


@pytest.fixture
def minilm_l3() -> pathlib.Path:
    return require_shared(MINILM_L3)


@pytest.fixture
def data_dir() -> pathlib.Path:
    return require_shared(DATA_DIR)
