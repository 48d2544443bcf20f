"""The embedder part kind: the built-in ``lab-hog`` embedder, the conformance check of
``krea2kit plugins --check``, the listing, and a plugin embedder written from CONTRIBUTING.md
used by a ``--keep-diverse`` run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from krea2kit.diversity.scores import distance_matrix
from krea2kit.parts.embedders import DIM, LabHogEmbedder, features, srgb_to_lab
from krea2kit.plugins import Host, reset_host
from krea2kit.registry import EmbedderDescriptor
from krea2kit.testing import check_part, check_plugin

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _picture(colour, shape="circle", size=64, background=(255, 255, 255)):
    image = Image.new("RGB", (size, size), background)
    box = (size // 8, size // 8, size // 2, size // 2)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return image


# --- lab-hog ---------------------------------------------------------------------------------


def test_lab_conversion_matches_reference_values():
    # sRGB white, black, pure red (CIE L*a*b*, D65: widely tabulated, e.g. Bruce Lindbloom's calculator)
    lab = srgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert lab[0] == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    assert lab[1] == pytest.approx([0.0, 0.0, 0.0], abs=0.01)
    assert lab[2] == pytest.approx([53.24, 80.09, 67.20], abs=0.05)


def test_lab_hog_is_deterministic_unit_and_batch_independent():
    images = [_picture((220, 30, 30)), _picture((30, 30, 220), "square"), Image.new("RGB", (40, 24), (90, 90, 90))]
    a = LabHogEmbedder().embed(images)
    b = LabHogEmbedder().embed(list(reversed(images)))
    assert a.shape == (3, DIM) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(a, b.flip(0))  # same image, same row, whatever else is in the batch
    assert LabHogEmbedder().embed([]).shape == (0, DIM)


def test_lab_hog_distances_follow_what_changes():
    red_circle = _picture((220, 30, 30))
    d = distance_matrix(LabHogEmbedder().embed([
        red_circle, red_circle.resize((128, 128), Image.Resampling.NEAREST),  # the same picture, larger
        _picture((30, 30, 220)),                                               # another colour
        _picture((220, 30, 30), "square"),                                     # another shape
        _picture((220, 30, 30), background=(0, 0, 0)),                         # another background
    ]))
    same, colour, shape, background = d[0, 1], d[0, 2], d[0, 3], d[0, 4]
    assert same < 0.05  # resampling moves edges by a pixel: small, not zero
    assert colour > 5 * same and shape > 5 * same and background > colour
    assert features(Image.new("RGB", (8, 8), (128, 128, 128)))[0] != 0  # flat images keep a direction


# --- the conformance check -------------------------------------------------------------------


def test_builtin_embedder_passes_the_check():
    host = Host(load_entry_points=False)
    result = check_part(host.registry.get("embedder", "lab-hog"), registry=host.registry)
    assert result.status == "ok", result.line()
    assert "unit rows of 256" in result.detail


class _Bad:
    name = "bad"
    dim = 4

    def __init__(self, how):
        self.how = how

    def embed(self, images):
        rows = torch.stack([torch.full((4,), float(im.size[0])) for im in images])
        if self.how == "unnormalised":
            return rows
        rows = torch.nn.functional.normalize(rows + torch.arange(4.0), dim=1)
        if self.how == "shape":
            return rows[:, :3]
        if self.how == "batch":  # depends on the batch: centred on its mean
            return torch.nn.functional.normalize(rows - rows.mean(0) + 1e-3, dim=1)
        return rows


@pytest.mark.parametrize("how, message", [
    ("unnormalised", "not L2-normalised"),
    ("shape", "expected (3, 4)"),
    ("batch", "alone differs"),
])
def test_the_check_catches_broken_embedders(how, message):
    descriptor = EmbedderDescriptor(name="bad", summary="", load=lambda options, context: _Bad(how))
    result = check_part(descriptor)
    assert result.status == "fail" and message in result.detail, result.line()
    assert check_part(descriptor, part=_Bad("fine")).status == "ok"


def test_an_embedder_without_its_weights_is_skipped_not_failed():
    from krea2kit.errors import WeightsError

    def load(options, context):
        raise WeightsError("no CLIP weights given", key="plugins.x.clip_weights")

    needs = EmbedderDescriptor(name="w", summary="", load=load, needs_weights=True)
    assert check_part(needs).status == "skip" and "clip_weights" in check_part(needs).detail
    assert check_part(replace(needs, needs_weights=False)).status == "fail"


def test_listing_shows_the_embedder(cli_inproc):
    res = cli_inproc("plugins", "--json")
    builtin = next(p for p in json.loads(res.stdout)["plugins"] if p["name"] == "krea2kit")
    assert builtin["registers"]["embedder"] == ["lab-hog"] and "register_embedders" in builtin["hooks"]
    assert "embedder: lab-hog" in cli_inproc("plugins").stdout


# --- a plugin embedder from CONTRIBUTING.md --------------------------------------------------


def _contributing_hue():
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n# plugin module: krea2kit_hue\.py\n(.*?)```", text, re.S)
    assert found, "CONTRIBUTING.md lost its embedder example"
    return found.group(1)


@pytest.fixture
def hue_plugin(tmp_path):
    path = tmp_path / "krea2kit_hue.py"
    path.write_text(_contributing_hue())
    spec = importlib.util.spec_from_file_location("krea2kit_hue", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contributing_embedder_passes_the_contract_check(hue_plugin):
    results = check_plugin(hue_plugin, "krea2kit-hue", allow_skips=False)
    assert [(r.kind, r.name, r.status) for r in results] == [("embedder", "hue", "ok")], [r.line() for r in results]


def test_contributing_embedder_drives_keep_diverse(cli_inproc, hue_plugin, tmp_path, one_thread):
    reset_host(Host(load_entry_points=False, extra_plugins=((hue_plugin, "krea2kit-hue"),)))
    try:
        res = cli_inproc("run", "--prompt", "a red circle on a white background", "--set", "count=3",
                         "--set", "sampler.steps=2", "--set", 'diversity.embedder="hue"', "--set", "diversity.bins=6",
                         "--keep-diverse", "2", "--json", "--set", 'output.dir="out"')
        assert res.code == 0, res.stderr
        lines = [json.loads(line) for line in res.stdout.splitlines()]
        assert [r["status"] for r in lines].count("ok") == 2 and len(os.listdir(tmp_path / "out")) == 2
        assert {r["diversity"]["embedder"] for r in lines} == {"krea2kit-hue:hue"}
        assert {r["diversity"]["embedder_id"] for r in lines} == {"hue-histogram-6"}
        bad = cli_inproc("run", "--prompt", "x", "--set", 'diversity.embedder="hue"', "--set", "diversity.bins=1",
                         "--dry-run")
        assert bad.code == 2 and "diversity.bins" in bad.stderr
    finally:
        reset_host(None)
