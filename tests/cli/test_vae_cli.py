"""`krea2kit vae roundtrip` through the real CLI on the nano VAE."""

from __future__ import annotations

import json

from PIL import Image


def test_roundtrip_writes_an_image_and_reports_psnr(cli, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGBA", (40, 36), (200, 30, 30, 128)).save(src)  # not RGB, not a multiple of 8
    res = cli("vae", "roundtrip", str(src), "--json", "--model", "krea2-nano-turbo")
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["vae"] == "qwen-image" and info["size"] == [40, 36]
    assert isinstance(info["psnr"], float)
    with Image.open(tmp_path / "in-roundtrip.png") as im:
        assert im.size == (40, 36) and im.mode == "RGB"
    assert "RGB" in res.stderr  # the conversion note


def test_roundtrip_bad_inputs(cli, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    res = cli("vae", "roundtrip", str(tmp_path / "bad.png"))
    assert res.code == 2 and "not a readable image" in res.stderr
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    small = cli("vae", "roundtrip", str(tiny))
    assert small.code == 2 and "at least 16" in small.stderr
    weights = cli("vae", "roundtrip", str(tiny), "--vae", "flux2")
    assert weights.code == 2 and "--weights" in weights.stderr
    unknown = cli("vae", "roundtrip", str(tiny), "--vae", "qwen-imag")
    assert unknown.code == 2 and "did you mean 'qwen-image'" in unknown.stderr
