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


def _portrait():
    """A real photograph with a person in it: matplotlib's sample portrait of Grace Hopper
    (US Navy photo, public domain), shipped inside the matplotlib wheel."""
    matplotlib = pytest.importorskip("matplotlib")
    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def test_real_detector_blocks_what_its_block_classes_name_on_a_real_photo():
    """The whole block path with the real model: the detector finds the face, a filter whose
    block classes include faces blocks the image, the default filter (exposed regions only)
    allows it. No explicit image is needed in the repository to show both verdicts."""
    photo = _portrait()
    faces = [d for d in NudeNetImageFilter().detect(photo) if d["class"] == "FACE_FEMALE"]
    assert faces and faces[0]["score"] >= 0.4
    default = NudeNetImageFilter().check_image(photo)
    assert default.action == "allow" and default.score == 0.0
    strict = NudeNetImageFilter(block_classes=["FACE_FEMALE"], threshold=0.4).check_image(photo)
    assert strict.action == "block" and strict.category == "sexual/explicit"
    assert strict.score >= 0.4 and "FACE_FEMALE" in strict.detail


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
