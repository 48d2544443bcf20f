"""Fixtures: the stand-in OpenAI-compatible server (stand_in_server.py) and its environment."""

from __future__ import annotations

import pytest
from stand_in_server import KEY, StandIn


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.stop()


@pytest.fixture
def endpoint_env(stand_in, monkeypatch):
    """The stand-in as the expander endpoint, through the environment variables."""
    monkeypatch.setenv("KREA2KIT_EXPANDER_BASE_URL", stand_in.base_url)
    monkeypatch.setenv("KREA2KIT_EXPANDER_MODEL", "stand-in-model")
    monkeypatch.setenv("KREA2KIT_EXPANDER_API_KEY", KEY)
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return stand_in
