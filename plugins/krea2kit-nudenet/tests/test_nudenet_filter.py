"""The NudeNet plugin: registration, verdict policy, and the real detector when installed."""

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run without installing

import krea2kit_nudenet  # noqa: E402
from krea2kit_nudenet.filter import (COVERED, EXPOSED, NudeNetImageFilter,  # noqa: E402
                                     NudeNetLoadError, from_config)
from krea2kit.safety.verdict import load_filter, run_filters  # noqa: E402


class FakeDetector:
    def __init__(self, dets):
        self.dets = dets
        self.seen = None

    def detect(self, arr):
        self.seen = arr
        return self.dets


def _f(dets, **kw):
    return NudeNetImageFilter(detector=FakeDetector(dets), **kw)


def test_registers_an_image_filter_through_the_host():
    from krea2kit.plugins import Host

    host = Host(load_entry_points=False, extra_plugins=((krea2kit_nudenet, "nudenet"),))
    assert host.plugins["nudenet"].registers == {"filter": ["nudenet"]}
    found = []
    krea2kit_nudenet.register_filters(found.append)
    (d,) = found
    assert d.name == "nudenet" and d.target == "image" and d.load == "krea2kit_nudenet.filter:load"
    # options validate through the host's schema machinery (pydantic)
    opts = d.validate_options({"threshold": 0.3, "flag_classes": []}, where="safety.settings.nudenet")
    assert opts.threshold == 0.3 and opts.block_classes == list(EXPOSED)


def test_policy_block_flag_allow():
    v = _f([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.81, "box": [0, 0, 1, 1]},
            {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}]).check_image(Image.new("RGB", (4, 4)))
    assert v.action == "block" and v.category == "sexual/explicit" and v.score == pytest.approx(0.81)
    assert "FEMALE_BREAST_EXPOSED 0.81" in v.detail
    v = _f([{"class": "BUTTOCKS_COVERED", "score": 0.45, "box": [0, 0, 1, 1]}]).check_image(Image.new("RGB", (4, 4)))
    assert v.action == "flag" and v.score == 0.0
    v = _f([{"class": "BUTTOCKS_EXPOSED", "score": 0.45, "box": [0, 0, 1, 1]}]).check_image(Image.new("RGB", (4, 4)))
    assert v.action == "flag" and v.score == pytest.approx(0.45)
    v = _f([{"class": "FACE_MALE", "score": 0.99, "box": [0, 0, 1, 1]}]).check_image(Image.new("RGB", (4, 4)))
    assert v.action == "allow" and "1 region" in v.detail
    v = _f([{"class": "BUTTOCKS_EXPOSED", "score": 0.45, "box": [0, 0, 1, 1]}],
           flag_threshold=None).check_image(Image.new("RGB", (4, 4)))
    assert v.action == "allow"


def test_image_is_passed_as_bgr():
    det = FakeDetector([])
    f = NudeNetImageFilter(detector=det)
    f.check_image(Image.new("RGBA", (3, 2), (10, 20, 30, 0)))
    assert det.seen.shape == (2, 3, 3) and tuple(det.seen[0, 0]) == (30, 20, 10)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown NudeNet label"):
        _f([], block_classes=["NOPE"])
    with pytest.raises(ValueError, match="unknown nudenet option"):
        from_config({"treshold": 1})
    assert set(EXPOSED).isdisjoint(COVERED)


def test_load_accepts_options_model_dict_or_none(monkeypatch):
    from krea2kit_nudenet import filter as mod

    seen = []
    monkeypatch.setattr(mod, "NudeNetImageFilter", lambda **kw: seen.append(kw) or "built")
    from krea2kit.contracts import LoadContext

    assert mod.load(mod.NudeNetOptions(threshold=0.2), LoadContext(role="filter")) == "built"
    assert mod.load({"threshold": 0.7}, LoadContext()) == "built" and mod.load(None, LoadContext()) == "built"
    assert seen[0]["threshold"] == 0.2 and seen[1] == {"threshold": 0.7} and seen[2] == {}


def test_missing_package_fails_closed(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(NudeNetLoadError, match="needs the nudenet package"):
        NudeNetImageFilter()
    d = run_filters([load_filter("nudenet", from_config)], Image.new("RGB", (4, 4)), kind="image")
    assert d.blocked and "krea2kit-nudenet" in d.blocking[0].detail


def test_follows_the_krea2kit_plugin_contract():
    """The load signature and the filter's protocol, checked by krea2kit's own checker on a
    filter around a fake detector (the real one: test_nudenet_real.py)."""
    from krea2kit.plugins import Host
    from krea2kit.testing import check_part

    host = Host(load_entry_points=False, extra_plugins=((krea2kit_nudenet, "krea2kit-nudenet"),))
    (descriptor,) = [d for d in host.registry.all("filter") if d.plugin == "krea2kit-nudenet"]
    result = check_part(descriptor, registry=host.registry, part=_f([]))
    assert result.status == "ok", result.line()
    assert "gray image -> allow" in result.detail
