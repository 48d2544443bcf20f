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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model tests on one torch thread: on a shared 2-core machine two
    OpenMP threads spin against other processes (measured 15x slower); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture
def cli_inproc(isolated_env, tmp_path, monkeypatch, capsys):
    """The same CLI entry point as ``cli``, called in this process (fast, for the many
    recipe-validation cases that load no model)."""
    from krea2kit.cli import main

    for key in ("KREA2KIT_CONFIG", "KREA2KIT_CACHE_DIR", "NO_COLOR", "COLUMNS"):
        monkeypatch.setenv(key, isolated_env[key])
    monkeypatch.chdir(tmp_path)

    def run(*args: str, input: str | None = None, env: dict | None = None) -> CliResult:
        import io

        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        if input is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(input))
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
