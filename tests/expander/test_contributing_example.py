"""CONTRIBUTING.md's prompt expander example, read from the page: it passes the contract check
and drives a nano run as ``[expander] backend = "suffix"`` with its ``[plugins.<name>]`` table."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from krea2kit.output.metadata import read_image_metadata

ROOT = Path(__file__).resolve().parents[2]
NAME = "krea2kit-suffix"


@pytest.fixture
def suffix_plugin(tmp_path):
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n# plugin module: krea2kit_suffix\.py\n(.*?)```", text, re.S)
    assert found, "CONTRIBUTING.md lost the prompt expander example"
    path = tmp_path / "krea2kit_suffix.py"
    path.write_text(found.group(1))
    spec = importlib.util.spec_from_file_location("krea2kit_suffix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_passes_the_contract_check(suffix_plugin):
    from krea2kit.testing import check_plugin

    results = check_plugin(suffix_plugin, NAME, allow_skips=False)
    assert {(r.kind, r.name, r.status) for r in results} >= {("prompt_expander", "suffix", "ok")}, \
        [r.line() for r in results]


def test_example_expands_a_nano_run(cli_inproc, suffix_plugin, tmp_path, one_thread):
    from krea2kit.plugins import Host, reset_host

    reset_host(Host(load_entry_points=False, extra_plugins=((suffix_plugin, NAME),)))
    try:
        (tmp_path / "r.toml").write_text(
            'prompt = "a lighthouse."\nwidth = 64\nheight = 64\n[sampler]\nsteps = 2\n'
            '[expander]\nenabled = true\nbackend = "suffix"\n'
            f'[plugins.{NAME}]\nsuffix = "at dusk, seen from the sea"\n')
        res = cli_inproc("run", "r.toml", "--json")
        assert res.code == 0, res.stderr
        (rec,) = [json.loads(line) for line in res.stdout.splitlines()]
        assert rec["prompt"] == "a lighthouse, at dusk, seen from the sea"
        assert rec["original_prompt"] == "a lighthouse." and rec["expansion"]["identity"].startswith("suffix:")
        assert read_image_metadata(rec["path"])["krea2kit"]["expander"]["expanded"] == rec["prompt"]
    finally:
        reset_host(None)
