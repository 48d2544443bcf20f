"""Atomic image writers with metadata, and file-name templates."""

import os

import pytest
from PIL import Image

from krea2kit.errors import UsageError
from krea2kit.output.metadata import (TRAINED_ALGORITHMIC_MEDIA, ImageMetadata, build_parameters,
                                      build_record, generation_params, parse_parameters,
                                      read_image_metadata)
from krea2kit.output.writers import OutputError, render_name, slugify, write_image

PROMPT = "a fox, walking: in the snow ✓ 漢字"


def _meta(prompt=PROMPT, big=False):
    params = generation_params(steps=8, sampler="euler", guidance=0, seed=42, width=64, height=48,
                               model="krea2-turbo", shift_mu=1.15)
    recipe = {"prompt": prompt, "seed": 42, "steps": 8, "pad": "x" * (70_000 if big else 10)}
    rec = build_record(recipe=recipe, plugins={"krea2kit": "0.1.0"},
                       filters=[{"kind": "prompt", "action": "allow", "verdicts": []}])
    return ImageMetadata(build_parameters(prompt, "blurry", params), rec)


def _image(mode="RGB"):
    im = Image.new(mode, (64, 48))
    im.putdata([(x % 256, (x * 7) % 256, (x * 13) % 256) + ((200,) if mode == "RGBA" else ())
                for x in range(64 * 48)])
    return im


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_metadata_round_trip(tmp_path, fmt):
    md = _meta()
    out = write_image(_image(), tmp_path / f"img.{fmt}", format=fmt, metadata=md)
    assert out == tmp_path / f"img.{fmt}"
    back = read_image_metadata(out)
    assert back["format"] == fmt
    assert back["parameters"] == md.parameters
    assert parse_parameters(back["parameters"])["prompt"] == PROMPT
    assert back["krea2kit"] == md.krea2kit
    assert back["xmp_dst"] == TRAINED_ALGORITHMIC_MEDIA
    assert os.listdir(tmp_path) == [f"img.{fmt}"]  # no temp file left
    with Image.open(out) as im:
        assert im.size == (64, 48)
        if fmt != "png":
            assert im.getexif()[0x0131].startswith("krea2kit ")


def test_png_is_lossless_and_writes_the_expected_chunks(tmp_path):
    im = _image("RGBA")
    out = write_image(im, tmp_path / "a.png", metadata=_meta())
    with Image.open(out) as back:
        back.load()
        assert back.mode == im.mode and back.tobytes() == im.tobytes()
        assert set(back.text) >= {"parameters", "krea2kit", "XML:com.adobe.xmp"}
        assert b'"pad"' not in back.info["XML:com.adobe.xmp"].encode()  # record is its own chunk


def test_privacy_parameters_none_still_marks_ai(tmp_path):
    md = ImageMetadata(None, build_record(recipe={"prompt": None}))
    for fmt in ("png", "jpeg", "webp"):
        back = read_image_metadata(write_image(_image(), tmp_path / f"p.{fmt}", metadata=md))
        assert back["parameters"] is None and back["xmp_dst"] == TRAINED_ALGORITHMIC_MEDIA


def test_no_metadata_still_marks_ai(tmp_path):
    md = ImageMetadata(None, {})
    for fmt in ("png", "jpeg", "webp"):
        back = read_image_metadata(write_image(_image(), tmp_path / f"n.{fmt}", metadata=md))
        assert back == {"format": fmt, "parameters": None, "krea2kit": None,
                        "xmp_dst": TRAINED_ALGORITHMIC_MEDIA}


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_deterministic_bytes(tmp_path, fmt):
    a = write_image(_image(), tmp_path / f"a.{fmt}", metadata=_meta())
    b = write_image(_image(), tmp_path / f"b.{fmt}", metadata=_meta())
    assert a.read_bytes() == b.read_bytes()


def test_format_from_extension_and_aliases(tmp_path):
    assert read_image_metadata(write_image(_image(), tmp_path / "x.JPG", metadata=_meta()))["format"] == "jpeg"
    assert read_image_metadata(write_image(_image(), tmp_path / "y.bin", format="jpg",
                                           metadata=_meta()))["format"] == "jpeg"
    with pytest.raises(UsageError):
        write_image(_image(), tmp_path / "noext", metadata=_meta())
    with pytest.raises(UsageError):
        write_image(_image(), tmp_path / "x.gif", metadata=_meta())
    with pytest.raises(UsageError):
        write_image(_image(), tmp_path / "x.png", metadata=_meta(), quality=90)


def test_quality_and_rgba_to_jpeg(tmp_path):
    lo = write_image(_image("RGBA"), tmp_path / "lo.jpg", metadata=_meta(), quality=20)
    hi = write_image(_image("RGBA"), tmp_path / "hi.jpg", metadata=_meta(), quality=100)
    assert lo.stat().st_size < hi.stat().st_size
    with pytest.raises(UsageError):
        write_image(_image(), tmp_path / "q.webp", metadata=_meta(), quality=0)


def test_failure_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old image")
    im = _image()
    real_save = Image.Image.save

    def half_then_fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half written")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OutputError, match="disk full"):
        write_image(im, target, metadata=_meta(), overwrite=True)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert target.read_bytes() == b"old image"
    assert os.listdir(tmp_path) == ["keep.png"]


def test_jpeg_metadata_limit_is_a_clear_error(tmp_path):
    with pytest.raises(OutputError, match="does not fit"):
        write_image(_image(), tmp_path / "big.jpg", metadata=_meta(big=True))
    assert not any(tmp_path.iterdir())
    big = write_image(_image(), tmp_path / "big.webp", metadata=_meta(big=True))
    assert len(read_image_metadata(big)["krea2kit"]["recipe"]["pad"]) == 70_000
    big = write_image(_image(), tmp_path / "big.png", metadata=_meta(big=True))
    assert len(read_image_metadata(big)["krea2kit"]["recipe"]["pad"]) == 70_000


def test_overwrite_false(tmp_path):
    write_image(_image(), tmp_path / "a.png", metadata=_meta())
    with pytest.raises(OutputError, match="already exists"):
        write_image(_image(), tmp_path / "a.png", metadata=_meta(), overwrite=False)


def test_file_permissions_follow_umask(tmp_path):
    out = write_image(_image(), tmp_path / "a.png", metadata=_meta())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_corrupt_record_is_reported(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("krea2kit", "{not json")
    p = tmp_path / "bad.png"
    _image().save(p, pnginfo=info)
    with pytest.raises(ValueError, match="not valid JSON"):
        read_image_metadata(p)


def test_read_plain_image_has_no_metadata(tmp_path):
    p = tmp_path / "plain.png"
    _image().save(p)
    assert read_image_metadata(p) == {"format": "png", "parameters": None, "krea2kit": None,
                                      "xmp_dst": None}


# -- file names -------------------------------------------------------------------------------

def test_render_name_fields():
    name = render_name("{date}/{recipe}-{model}-{index:03d}-{seed}-{prompt_slug}.png", index=7,
                       seed=123, prompt="A Fox, walking in the Snow! ✓ über", recipe="my recipe.toml",
                       model="krea2/turbo", date="2026-11-25")
    assert name == "2026-11-25/my-recipe.toml-krea2-turbo-007-123-a-fox-walking-in-the-snow-uber.png"


def test_render_name_default_date_and_slug_field():
    import datetime

    name = render_name("{date}-{prompt_slug}", prompt_slug="Hello World")
    assert name == f"{datetime.date.today().isoformat()}-hello-world"


@pytest.mark.parametrize("template, fields, match", [
    ("{nope}.png", {}, "unknown field"),
    ("{index}.png", {"colour": 1}, "unknown file-name field"),
    ("{seed}.png", {"index": 1}, "needs {seed}"),
    ("{}.png", {"index": 1}, "positional"),
    ("{index:q}.png", {"index": 1}, "not allowed"),
    ("../{index}.png", {"index": 1}, "unsafe"),
    ("/abs/{index}.png", {"index": 1}, "unsafe"),
    ("{index", {"index": 1}, "bad file-name template"),
    # untrusted templates: no huge widths, no attribute/item access, no conversions, no fills
    ("{index:0300d}", {"index": 1}, "not allowed"),
    ("{index:013d}", {"index": 1}, "at most 12"),
    ("{index:{seed}}", {"index": 1, "seed": 2}, "not allowed"),
    ("{index:/>4}", {"index": 1}, "not allowed"),
    ("{recipe:300}", {"recipe": "r"}, "not allowed"),
    ("{date:04d}", {}, "not allowed"),
    ("{index.__class__}", {"index": 1}, "attribute or index access"),
    ("{seed[0]}", {"seed": 1}, "attribute or index access"),
    ("{recipe!r}", {"recipe": "r"}, "conversion"),
    # names that are not names
    (".", {}, "unsafe"),
    ("..", {}, "unsafe"),
    ("a/./{index}", {"index": 1}, "unsafe"),
    ("a//{index}", {"index": 1}, "unsafe"),
    ("{index}/", {"index": 1}, "unsafe"),
    ("", {}, "empty"),
    ("a\x00{index}", {"index": 1}, "character"),
    ("a\n{index}", {"index": 1}, "character"),
    ("a\\{index}", {"index": 1}, "character"),
])
def test_render_name_errors(template, fields, match):
    with pytest.raises(UsageError, match=match):
        render_name(template, **fields)


@pytest.mark.parametrize("template, expected", [
    ("{index:04d}-{seed:x}", "0007-ff"),
    ("{index:12}", "           7"),
    ("{recipe:.3}-{prompt_slug:.5}", "my--a-fox"),
    ("{{literal}}-{index}", "{literal}-7"),
])
def test_render_name_bounded_formats_still_work(template, expected):
    assert render_name(template, index=7, seed=255, recipe="my recipe", prompt="A fox in snow") == expected


def test_values_cannot_escape_the_directory():
    assert render_name("{recipe}/{index}.png", recipe="../../etc", index=1) == "etc/1.png"
    assert "/" not in render_name("{model}", model="a/b\\c")


def test_slugify():
    assert slugify("  Ünïcödé — Prompt!! ") == "unicode-prompt"
    assert slugify("漢字") == "untitled"
    long = slugify("word " * 40, max_length=20)
    assert len(long) <= 20 and not long.endswith("-") and long.startswith("word-word")
