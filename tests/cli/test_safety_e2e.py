"""Content filters end to end through the real CLI: prompt blocks, a test-only image filter
that blocks a marker image, fail-closed loading, the audit log, the deployer's unfiltered
switch and what each image records."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from PIL import Image

from plugin_factory import make_plugin

RECIPE = """
seed = 10
width = 64
height = 64
count = 2
prompt = "a red circle"
[sampler]
steps = 2
[output]
dir = "out"
name = "img-{index:02d}-{seed}"
"""

MARKER_FILTER = """
import hashlib
from pydantic import BaseModel, ConfigDict
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import FilterDescriptor
from krea2kit.safety.verdict import Verdict

class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    marker: str = ""

class MarkerFilter:
    name = "marker-block"
    version = "1"
    def __init__(self, marker):
        self.marker = marker
    def check_image(self, image):
        digest = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
        if digest == self.marker:
            return Verdict(self.name, self.version, "block", "test/marker", 1.0, "the marker image")
        return Verdict(self.name, self.version, "allow")

def load(options=None, settings=None):
    return MarkerFilter(options.marker if options else "")

@hookimpl
def register_filters(register):
    register(FilterDescriptor(name="marker-block", summary="blocks one marker image (tests)",
                              load=load, options=Options, target="image"))
"""

BROKEN_FILTER = """
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import FilterDescriptor

def load(options=None, settings=None):
    raise RuntimeError("model file missing")

@hookimpl
def register_filters(register):
    register(FilterDescriptor(name="broken-filter", summary="cannot load", load=load, target="image",
                              mandatory=True))
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def audit_lines(isolated_env):
    path = os.path.join(isolated_env["KREA2KIT_CACHE_DIR"], "audit.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def env_with(path):
    return {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}


def test_blocked_prompt_writes_nothing_and_exits_3(cli, recipe, tmp_path, isolated_env):
    res = cli("run", str(recipe), "--json", "--prompt", "explicit sex scene with a 12 year old")
    assert res.code == 3, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in records] == ["blocked", "blocked"]
    assert all(r["path"] is None and "krea2kit.prompt" in r["blocked_by"] for r in records)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert "blocked" in res.stderr
    lines = audit_lines(isolated_env)
    prompt_lines = [line for line in lines if line["kind"] == "prompt" and line["action"] == "block"]
    assert prompt_lines and "prompt" not in prompt_lines[0]  # stored as a hash by default
    assert prompt_lines[0]["prompt_sha256"] == hashlib.sha256(
        "explicit sex scene with a 12 year old".encode()).hexdigest()


def test_marker_image_is_blocked_and_the_others_complete(cli, recipe, tmp_path, isolated_env):
    site = make_plugin(tmp_path / "site", "krea2kit-marker", "k2marker", MARKER_FILTER)
    env = env_with(site)
    first = cli("run", str(recipe), "-q", "--json", "--set", "count=1", env=env)  # find the marker image
    assert first.code == 0, first.stderr
    record = json.loads(first.stdout)
    # an installed filter plugin runs without the recipe naming it
    assert any(v["filter"] == "marker-block" and v["action"] == "allow" for v in record["verdicts"])
    with Image.open(tmp_path / record["path"]) as im:
        marker = hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()
    (tmp_path / record["path"]).unlink()
    res = cli("run", str(recipe), "--json", "--set", 'safety.filters=["marker-block"]',
              "--set", f'safety.settings.marker-block.marker="{marker}"', env=env)
    assert res.code == 3, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in records] == ["blocked", "ok"]
    assert records[0]["blocked_by"] == ["marker-block"] and records[0]["path"] is None
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img-01-11.png"]
    image_lines = [line for line in audit_lines(isolated_env) if line["kind"] == "image"]
    assert any(line["filter"] == "marker-block" and line["action"] == "block" for line in image_lines)
    assert any(line["filter"] == "krea2kit.opennsfw" for line in image_lines)


def test_filter_that_fails_to_load_blocks_everything(cli, recipe, tmp_path):
    site = make_plugin(tmp_path / "site", "krea2kit-brokenfilter", "k2bf", BROKEN_FILTER)
    res = cli("run", str(recipe), "--json", env=env_with(site))
    assert res.code == 3, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert all(r["status"] == "blocked" and "broken-filter" in r["blocked_by"] for r in records)
    assert "broken-filter" in res.stderr and "model file missing" in res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_recipe_cannot_loosen_the_image_threshold(cli, recipe, tmp_path):
    res = cli("run", str(recipe), "--set", "safety.settings.nsfw-image.threshold=0.99")
    assert res.code == 2 and "may only lower" in res.stderr
    assert "safety.settings.nsfw-image.threshold" in res.stderr and "loading" not in res.stderr
    # found at plan time: `recipe check` and a dry run refuse it too, naming the file
    for args in (("recipe", "check"), ("run", "--dry-run")):
        res = cli(*args, str(recipe), "--set", "safety.settings.nsfw-image.threshold=0.9")
        assert res.code == 2 and "may only lower" in res.stderr, (args, res.stderr)
    # the deployer's own ceiling moves the limit both ways
    (tmp_path / "config.toml").write_text("[safety]\nimage_threshold = 0.3\n")
    res = cli("recipe", "check", str(recipe), "--set", "safety.settings.nsfw-image.threshold=0.4")
    assert res.code == 2 and "deployer value 0.3" in res.stderr
    assert cli("recipe", "check", str(recipe), "--set", "safety.settings.nsfw-image.threshold=0.2").code == 0


def test_deployer_unfiltered_switch_is_recorded_in_every_image(cli, recipe, tmp_path):
    (tmp_path / "config.toml").write_text("[safety]\nunfiltered = true\n")
    res = cli("run", str(recipe), "-v")
    assert res.code == 0, res.stderr
    assert "unfiltered" in res.stderr
    from krea2kit.output.metadata import read_image_metadata

    for line in res.stdout.splitlines():
        meta = read_image_metadata(tmp_path / line)
        assert meta["krea2kit"]["unfiltered"] is True
        assert meta["xmp_dst"].endswith("trainedAlgorithmicMedia")


def test_filtered_images_record_verdicts_and_private_prompts(cli, recipe, tmp_path):
    res = cli("run", str(recipe), "--set", "count=1", "--set", "output.include_prompt=false", "--json")
    assert res.code == 0, res.stderr
    record = json.loads(res.stdout)
    assert record["prompt"] is None
    from krea2kit.output.metadata import read_image_metadata

    meta = read_image_metadata(tmp_path / record["path"])
    assert meta["krea2kit"]["unfiltered"] is False
    assert "a red circle" not in json.dumps(meta["krea2kit"]) and "a red circle" not in (meta["parameters"] or "")
    assert any(d["kind"] == "image" for d in meta["krea2kit"]["filters"])
    assert meta["xmp_dst"].endswith("trainedAlgorithmicMedia")


def test_recipe_can_require_a_filter_to_be_installed(cli, recipe):
    res = cli("run", str(recipe), "--dry-run", "--set", 'safety.filters=["nudenet"]')
    assert res.code == 2 and "unknown filter 'nudenet'" in res.stderr and "safety.filters[0]" in res.stderr
