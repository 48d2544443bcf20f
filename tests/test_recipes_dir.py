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


def test_the_style_training_example_trains_on_its_shipped_dataset(cli_inproc, tmp_path, monkeypatch):
    root = RECIPES[0].parents[1]
    monkeypatch.chdir(root)  # its dataset path starts in the folder you run in: the repository root
    out = tmp_path / "style.safetensors"
    res = cli_inproc("train", "recipes/train-style-nano.toml", "--steps", "3", "--threads", "1", "--json",
                     "--set", "samples.prompts=[]", "--set", f"output.path={json.dumps(str(out))}",
                     "--set", f"output.work_dir={json.dumps(str(tmp_path / 'work'))}")
    assert res.code == 0, res.stderr
    assert out.is_file() and json.loads(res.stdout.splitlines()[-1])["steps"] == 3
    planned = cli_inproc("train", "recipes/train-style-nano.toml", "--dry-run", "--json")
    assert planned.code == 0 and json.loads(planned.stdout.splitlines()[-1])["images"] == 32, planned.stderr
