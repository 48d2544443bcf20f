"""The NudeNet plugin with the real detector (skipped when nudenet is not installed)."""

import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run without installing

pytest.importorskip("nudenet")

from krea2kit_nudenet.filter import MODEL_SHA256, NudeNetImageFilter, NudeNetLoadError  # noqa: E402


def test_real_detector_on_plain_images():
    f = NudeNetImageFilter()
    assert f.version.startswith("nudenet 3.4.2; model sha256:" + MODEL_SHA256[:12])
    for im in (Image.new("RGB", (1024, 1024), (120, 160, 200)), Image.new("RGB", (640, 480), (224, 172, 140))):
        v = f.check_image(im)
        assert v.action == "allow" and v.score == 0.0


def test_corrupt_model_fails_closed(tmp_path):
    bad = tmp_path / "320n.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(NudeNetLoadError, match="corrupt"):
        NudeNetImageFilter(model_path=bad)
    with pytest.raises(NudeNetLoadError, match="cannot be loaded"):
        NudeNetImageFilter(model_path=bad, sha256="")
    with pytest.raises(NudeNetLoadError, match="does not exist"):
        NudeNetImageFilter(model_path=tmp_path / "missing.onnx")


def test_real_detector_passes_the_plugin_contract_check():
    import krea2kit_nudenet
    from krea2kit.testing import check_plugin

    (result,) = check_plugin(krea2kit_nudenet, "krea2kit-nudenet")
    assert result.status == "ok" and result.kind == "filter", result.line()
