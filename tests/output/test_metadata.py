"""A1111 parameters text, XMP packet and the krea2kit record."""

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from krea2kit import __version__
from krea2kit.output.metadata import (COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, NS_IPTC_EXT,
                                      TRAINED_ALGORITHMIC_MEDIA, ImageMetadata, build_parameters,
                                      build_record, build_xmp, canonical_json,
                                      decode_user_comment, encode_user_comment,
                                      generation_params, parse_parameters, parse_xmp, quote)
from krea2kit.safety.verdict import Decision, Verdict


def test_quote_follows_a1111():
    assert quote("euler") == "euler"
    assert quote(8) == "8"
    assert quote("a, b") == '"a, b"'
    assert quote("k: v") == '"k: v"'
    assert quote('line\n"q"') == '"line\\n\\"q\\""'


def _params(**kw):
    return generation_params(steps=8, sampler="euler", cfg_scale=1.0, seed=42, width=2048, height=1024,
                             model="krea2-turbo", model_hash="0123456789", cfg_convention="krea",
                             shift_mu=1.15, **kw)


def test_parameters_text_layout():
    text = build_parameters("a fox walking in the snow", "blurry", _params())
    assert text.splitlines() == [
        "a fox walking in the snow",
        "Negative prompt: blurry",
        "Steps: 8, Sampler: euler, CFG scale: 1, CFG convention: krea, Seed: 42, Size: 2048x1024, "
        f"Model hash: 0123456789, Model: krea2-turbo, Shift mu: 1.15, Version: krea2kit {__version__}",
    ]


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
@pytest.mark.parametrize("big_endian", [True, False])
def test_user_comment_round_trip(text, big_endian):
    raw = encode_user_comment(text, big_endian=big_endian)
    assert raw[:8] in (b"ASCII\x00\x00\x00", b"UNICODE\x00")
    assert decode_user_comment(raw, big_endian=big_endian) == text
