"""Shared test helpers: run the real CLI in a subprocess, isolated from the user's config."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def isolated_env(tmp_path):
    """An environment with its own config file, cache and no third-party plugin selection."""
    env = dict(os.environ)
    env["KREA2KIT_CONFIG"] = str(tmp_path / "config.toml")
    env["KREA2KIT_CACHE_DIR"] = str(tmp_path / "cache")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env.pop("KREA2KIT_STRICT_PLUGINS", None)
    return env


@pytest.fixture
def cli(isolated_env, tmp_path):
    """Run ``python -m krea2kit ARGS`` in ``tmp_path``; returns a CliResult."""

    def run(*args: str, input: str | None = None, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 300) -> CliResult:
        full_env = dict(isolated_env)
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "krea2kit", *args], input=input, capture_output=True, text=True,
            env=full_env, cwd=str(cwd or tmp_path), timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run
