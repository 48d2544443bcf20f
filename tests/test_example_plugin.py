"""The third-party path end to end: pip-install plugins/krea2kit-example (a real build of a
separate distribution with its entry point) into a folder, put it on PYTHONPATH, and drive
it through the krea2kit CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    # Build with the installed setuptools when it is new enough (no network needed),
    # else let pip fetch a build backend as it normally would.
    from importlib.metadata import version

    isolation = [] if int(version("setuptools").split(".")[0]) < 77 else ["--no-build-isolation"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
         "--target", str(target), str(ROOT / "plugins" / "krea2kit-example")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target


def test_example_plugin_listed_and_used_through_the_cli(cli, installed, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    listing = cli("plugins", "--json", env=env)
    assert listing.code == 0, listing.stderr
    example = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "krea2kit-example")
    assert example["distribution"] == "krea2kit-example" and example["version"] == "0.1.0"
    assert example["registers"] == {"options": ["krea2kit-example"], "writer": ["png-caption"]}
    assert example["contract"] == 2
    check = cli("plugins", "--check", "--json", env=env)
    assert check.code == 0, check.stdout + check.stderr
    parts = {(p["plugin"], p["name"]): p["status"] for p in json.loads(check.stdout)["parts"]}
    assert parts[("krea2kit-example", "png-caption")] == "ok"
    (tmp_path / "r.toml").write_text(
        'prompt = "a red circle"\nwidth = 64\nheight = 64\ncount = 2\n[sampler]\nsteps = 2\n'
        '[output]\nformat = "png-caption"\ndir = "data"\n'
        '[plugins.krea2kit-example]\nprefix = "nano style, "\n')
    res = cli("run", "r.toml", "-q", env=env)
    assert res.code == 0, res.stderr
    for line in res.stdout.splitlines():
        assert line.endswith(".png")
        assert (tmp_path / line).with_suffix(".txt").read_text() == "nano style, a red circle\n"
    bad = cli("run", "r.toml", "--set", "plugins.krea2kit-example.prefx=1", env=env)
    assert bad.code == 2 and "did you mean 'prefix'" in bad.stderr
    without = cli("run", "r.toml", "--dry-run")  # not installed: its writer is unknown
    assert without.code == 2 and "unknown writer 'png-caption'" in without.stderr
