"""Fixtures shared by the trainer's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One Session for the module: the nano parts load once (each Trainer detaches its
    adapters in close())."""
    import os

    from krea2kit.api import Session
    from krea2kit.settings import load_settings

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("KREA2KIT_CACHE_DIR")
    os.environ["KREA2KIT_CACHE_DIR"] = str(cache)
    yield Session(settings=load_settings(cache / "none.toml"))
    torch.set_num_threads(n)
    if old is None:
        os.environ.pop("KREA2KIT_CACHE_DIR", None)
    else:
        os.environ["KREA2KIT_CACHE_DIR"] = old
