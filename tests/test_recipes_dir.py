"""Every example recipe under recipes/ validates against the built-in plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_example_recipe_checks(cli_inproc, path):
    res = cli_inproc("recipe", "check", str(path))
    assert res.code == 0, res.stderr
    assert "ok:" in res.stderr


def test_there_are_examples():
    assert {p.stem for p in RECIPES} >= {"quickstart", "krea2-turbo", "krea2-raw", "style-slider"}
