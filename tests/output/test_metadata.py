"""A1111 parameters text, XMP packet and the krea2kit record."""

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from krea2kit import __version__
from krea2kit.output.metadata import (COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, NS_IPTC_EXT,
                                      TRAINED_ALGORITHMIC_MEDIA, ImageMetadata, build_parameters,
                                      build_exif, build_record, build_xmp, canonical_json,
                                      decode_user_comment, encode_user_comment,
                                      generation_params, parse_parameters, parse_xmp, quote,
                                      read_image_metadata)
from krea2kit.safety.verdict import Decision, Verdict


def test_quote_follows_a1111():
    assert quote("euler") == "euler"
    assert quote(8) == "8"
    assert quote("a, b") == '"a, b"'
    assert quote("k: v") == '"k: v"'
    assert quote('line\n"q"') == '"line\\n\\"q\\""'


def _params(**kw):
    return generation_params(steps=8, sampler="euler", guidance=3.5, seed=42, width=2048, height=1024,
                             model="krea2-turbo", model_hash="0123456789", shift_mu=1.15, **kw)


def test_parameters_text_layout():
    text = build_parameters("a fox walking in the snow", "blurry", _params())
    assert text.splitlines() == [
        "a fox walking in the snow",
        "Negative prompt: blurry",
        "Steps: 8, Sampler: euler, CFG scale: 4.5, Krea guidance: 3.5, Seed: 42, Size: 2048x1024, "
        f"Model hash: 0123456789, Model: krea2-turbo, Shift mu: 1.15, Version: krea2kit {__version__}",
    ]


@pytest.mark.parametrize("g", [0.0, 0.5, 1.0, 3.5, 7.25])
def test_cfg_scale_is_the_standard_scale(g):
    """A1111's CFG scale s (v = u + s(c - u)) gives Krea's velocity (v = c + g(c - u)) at s = g + 1;
    g = 0 (guidance off) is CFG scale 1, A1111's 'no guidance effect'."""
    fields = parse_parameters(build_parameters("p", None, generation_params(guidance=g)))["params"]
    s, krea_g = float(fields["CFG scale"]), float(fields["Krea guidance"])
    assert krea_g == g and s == g + 1
    cond, uncond = 0.7, -0.3
    assert uncond + s * (cond - uncond) == pytest.approx(cond + krea_g * (cond - uncond))


def test_parameters_round_trip_with_awkward_values():
    prompt = "line one, with: colon\nline two ✓ «ünïcödé»"
    params = _params(extra={"Content filter": "krea2kit.prompt 1.0, opennsfw: 0.5",
                            "Lora hashes": 'a: 1, b: "2"'})
    parsed = parse_parameters(build_parameters(prompt, "low quality, text", params))
    assert parsed["prompt"] == prompt
    assert parsed["negative_prompt"] == "low quality, text"
    assert parsed["params"] == {k: str(v) for k, v in params.items()}


def test_privacy_drops_prompt_but_keeps_fields():
    text = build_parameters(None, "blurry", _params())
    assert "blurry" not in text and text.startswith("Steps: 8")
    parsed = parse_parameters(text)
    assert parsed["prompt"] is None and parsed["params"]["Seed"] == "42"


def test_generation_params_rejects_unparseable_keys_and_skips_none():
    with pytest.raises(ValueError):
        generation_params(extra={"bad,key": 1})
    p = generation_params(seed=1, version="krea2kit test")
    assert p == {"Seed": 1, "Version": "krea2kit test"}


def test_xmp_is_valid_and_carries_the_marker():
    rec = build_record(recipe={"prompt": "<a & b>", "seed": 1})
    xmp = build_xmp(record=rec)
    root = ElementTree.fromstring(xmp)  # valid XML
    assert root.tag == "{adobe:ns:meta/}xmpmeta"
    assert root.find(f".//{{{NS_IPTC_EXT}}}DigitalSourceType").text == TRAINED_ALGORITHMIC_MEDIA
    parsed = parse_xmp(xmp)
    assert parsed == {"digital_source_type": TRAINED_ALGORITHMIC_MEDIA, "record": rec}
    assert parse_xmp(build_xmp(digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA))[
        "digital_source_type"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    with pytest.raises(ValueError):
        build_xmp(digital_source_type="http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture")


def test_pillow_getxmp_reads_the_marker(tmp_path):
    pytest.importorskip("defusedxml")  # Pillow's getxmp needs it; krea2kit's reader does not
    from PIL import Image
    from krea2kit.output.writers import write_image

    for fmt in ("png", "jpeg", "webp"):
        out = write_image(Image.new("RGB", (8, 8)), tmp_path / f"a.{fmt}",
                          metadata=ImageMetadata("x", build_record(recipe={})))
        with Image.open(out) as im:
            desc = im.getxmp()["xmpmeta"]["RDF"]["Description"]
        assert desc["DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA


def test_record_is_canonical_and_checked_early():
    dec = Decision("prompt", (Verdict("krea2kit.prompt", "1", "allow"),))
    rec = build_record(recipe={"b": 1, "a": Path("/w/x.safetensors")}, plugins={"krea2kit": "0.1.0"},
                       weights={"dit": {"sha256": "ab"}}, filters=[dec], unfiltered=False)
    assert rec["schema"] == 1 and rec["generator"] == f"krea2kit {__version__}"
    assert rec["recipe"] == {"a": "/w/x.safetensors", "b": 1}
    assert rec["filters"] == [dec.to_dict()] and rec["unfiltered"] is False
    assert canonical_json(rec) == canonical_json(json.loads(canonical_json(rec)))
    assert canonical_json({"b": 1, "a": [1.5]}) == '{"a":[1.5],"b":1}'
    with pytest.raises(TypeError):
        build_record(recipe={"x": object()})
    with pytest.raises(ValueError):
        build_record(recipe={"x": float("nan")})
    with pytest.raises(ValueError):
        build_record(recipe={}, extra={"recipe": 1})


def test_image_metadata_never_drops_the_ai_marker():
    with pytest.raises(ValueError, match="cannot be removed"):
        ImageMetadata("x", {}, digital_source_type="")
    with pytest.raises(TypeError):
        ImageMetadata("x", {"bad": object()})


@pytest.mark.parametrize("text", ["ascii only, Steps: 8", "ünïcödé ✓ 𝐱 漢字"])
def test_user_comment_is_what_a1111_writes(text):
    piexif_helper = pytest.importorskip("piexif.helper")
    raw = encode_user_comment(text)
    assert raw == piexif_helper.UserComment.dump(text, encoding="unicode")
    assert decode_user_comment(raw) == text


@pytest.mark.parametrize("big_endian", [True, False])
def test_user_comment_from_other_writers(big_endian):
    text = "ünïcödé ✓ 𝐱"
    utf16 = text.encode("utf-16-be" if big_endian else "utf-16-le")
    assert decode_user_comment(b"UNICODE\x00" + utf16, big_endian=big_endian) == text
    assert decode_user_comment(b"ASCII\x00\x00\x00Steps: 8") == "Steps: 8"


A1111_TEXT = "a fox, «ünïcödé» ✓ 𝐱\nNegative prompt: blurry\nSteps: 8, Sampler: euler, CFG scale: 4.5"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a1111_reads_the_user_comment(tmp_path, fmt):
    """Read the file the way AUTOMATIC1111 does (modules/images.py read_info_from_image)."""
    piexif = pytest.importorskip("piexif")
    import piexif.helper
    from PIL import Image
    from krea2kit.output.writers import write_image

    rec = build_record(recipe={"prompt": "a fox", "seed": 1})
    out = write_image(Image.new("RGB", (16, 8), "red"), tmp_path / f"a.{fmt}",
                      metadata=ImageMetadata(A1111_TEXT, rec))
    with Image.open(out) as im:
        exif = piexif.load(im.info["exif"])
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert isinstance(comment, bytes)  # type UNDEFINED; BYTE came back as a tuple of ints
    assert piexif.helper.UserComment.load(comment) == A1111_TEXT
    assert exif["0th"][piexif.ImageIFD.Software] == f"krea2kit {__version__}".encode()
    assert exif["Exif"][piexif.ExifIFD.ExifVersion] == b"0232"
    # piexif.load also accepts the whole file (it finds the APP1 / EXIF chunk itself).
    assert piexif.helper.UserComment.load(piexif.load(str(out))["Exif"][0x9286]) == A1111_TEXT
    # Our own reader, Pillow's EXIF parser and the XMP record still agree.
    back = read_image_metadata(out)
    assert back["parameters"] == A1111_TEXT and back["krea2kit"] == rec
    with Image.open(out) as im:
        assert im.getexif().get_ifd(0x8769)[0x9286] == encode_user_comment(A1111_TEXT)


def test_exif_without_parameters_has_no_user_comment(tmp_path):
    piexif = pytest.importorskip("piexif")
    exif = piexif.load(build_exif(parameters=None, software="krea2kit test"))
    assert piexif.ExifIFD.UserComment not in exif["Exif"]
    assert exif["0th"][piexif.ImageIFD.Software] == b"krea2kit test"


def test_exif_too_large_for_jpeg_is_a_clear_error(tmp_path):
    from PIL import Image
    from krea2kit.output.writers import OutputError, write_image

    with pytest.raises(OutputError, match="does not fit in a JPEG"):
        write_image(Image.new("RGB", (8, 8)), tmp_path / "a.jpg",
                    metadata=ImageMetadata("x" * 40000, {}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_cli_image_speaks_a1111(cli, tmp_path, fmt):
    """End to end: `krea2kit run` with the standard convention s = 3 (Krea g = 2) writes an image
    whose EXIF A1111 reads, with CFG scale 3 and Krea guidance 2; the record keeps the recipe's
    own convention, and the image re-runs from its record with the same guidance."""
    piexif = pytest.importorskip("piexif")
    import piexif.helper

    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
prompt = "a red circle"
seed = 7
width = 32
height = 32
model.preset = "krea2-nano-raw"
[sampler]
steps = 1
guidance = 3.0
convention = "standard"
[output]
dir = "out"
name = "img"
format = "{fmt}"
""")
    res = cli("run", str(recipe), "-q")
    assert res.code == 0, res.stderr
    out = tmp_path / res.stdout.strip()
    text = piexif.helper.UserComment.load(piexif.load(str(out))["Exif"][piexif.ExifIFD.UserComment])
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a red circle"
    assert parsed["params"]["CFG scale"] == "3" and parsed["params"]["Krea guidance"] == "2"
    meta = read_image_metadata(out)
    assert meta["parameters"] == text
    sampler = meta["krea2kit"]["recipe"]["sampler"]
    assert sampler["convention"] == "standard" and sampler["guidance"] == 3.0
