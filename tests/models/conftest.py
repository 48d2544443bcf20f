"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch

from krea2kit.models.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP barrier stalls on a shared, oversubscribed
    # CPU (15x faster here); restored afterwards for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A folder with a tiny byte-level BPE tokenizer.json carrying Qwen's special tokens."""
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return d
