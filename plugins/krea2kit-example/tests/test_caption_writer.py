"""Unit tests of the example plugin (the main krea2kit suite also runs it end to end)."""

from __future__ import annotations

import pytest
from PIL import Image
from pydantic import ValidationError

import krea2kit_example
from krea2kit.contracts import LoadContext, OutputInfo
from krea2kit.output.metadata import ImageMetadata, read_image_metadata
from krea2kit.testing import check_plugin


def info(prompt):
    return OutputInfo(metadata=ImageMetadata(parameters="p\nSteps: 1", krea2kit={"recipe": {"prompt": prompt}}),
                      prompt=prompt, negative="", seed=1, index=0)


def test_writes_png_with_metadata_and_caption(tmp_path):
    writer = krea2kit_example.load_writer(None, LoadContext(plugin_options=krea2kit_example.ExampleOptions(prefix="style, ")))
    path = writer.write(Image.new("RGB", (8, 8), "red"), tmp_path / "img.png", info("a red cube"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "img.txt").read_text() == "style, a red cube\n"
    assert read_image_metadata(path)["krea2kit"]["recipe"]["prompt"] == "a red cube"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "img.txt"]  # no temp files left


def test_private_prompt_gives_an_empty_caption(tmp_path):
    writer = krea2kit_example.load_writer(None, LoadContext())
    writer.write(Image.new("RGB", (8, 8)), tmp_path / "a.png", info(None))
    assert (tmp_path / "a.txt").read_text() == "\n"


def test_options_are_validated():
    with pytest.raises(ValidationError):
        krea2kit_example.ExampleOptions(caption_extension="txt")
    with pytest.raises(ValidationError):
        krea2kit_example.ExampleOptions(colour="blue")


def test_follows_the_krea2kit_plugin_contract():
    results = check_plugin(krea2kit_example, "krea2kit-example")  # raises, naming the part, on a failure
    assert {(r.kind, r.name, r.status) for r in results} == {("writer", "png-caption", "ok"),
                                                            ("options", "krea2kit-example", "ok")}
