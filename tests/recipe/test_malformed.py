"""Every malformed recipe in tests/recipe/malformed/ fails `recipe check` through the real
CLI with exit code 2, one message naming the file, the dotted key and what was expected,
and never a traceback. Each file states what it expects in its first two lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "malformed"
CASES = sorted(CORPUS.glob("*.toml"))


def expectations(path: Path) -> tuple[str, str]:
    text = path.read_text()
    expect = re.search(r"^# expect: (.*)$", text, re.M).group(1).strip()
    key = re.search(r"^# expect-key: ?(.*)$", text, re.M).group(1).strip()
    return expect, key


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_malformed_recipe_is_one_clear_error(cli_inproc, path):
    cli = cli_inproc
    expect, key = expectations(path)
    res = cli("recipe", "check", str(path))
    assert res.code == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert expect in res.stderr, res.stderr
    assert path.name in res.stderr, res.stderr
    if key:
        assert f": {key}:" in res.stderr, res.stderr
    # run --dry-run refuses the same recipe the same way, before loading anything
    run = cli("run", str(path), "--dry-run")
    assert run.code == 2 and expect in run.stderr


def test_corpus_is_not_empty():
    assert len(CASES) >= 20
