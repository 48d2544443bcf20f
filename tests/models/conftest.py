"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
from krea2kit.models.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every model test module runs on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A folder with a tiny byte-level BPE tokenizer.json carrying Qwen's special tokens."""
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return d
