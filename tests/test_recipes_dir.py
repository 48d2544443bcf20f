"""Every example recipe under recipes/ validates against the built-in plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_example_recipe_checks(cli_inproc, path, tmp_path):
    # A [[loras]] file is checked at plan time: give style-slider's default LoRA path (relative
    # to the current folder, tmp_path here) a small valid safetensors file, as a user would.
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    res = cli_inproc("recipe", "check", str(path))
    assert res.code == 0, res.stderr
    assert "ok:" in res.stderr


def test_there_are_examples():
    assert {p.stem for p in RECIPES} >= {"quickstart", "krea2-turbo", "krea2-raw", "style-slider"}
