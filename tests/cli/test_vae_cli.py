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


def _nan_vae(tmp_path, key_part: str):
    """A copy of the nano VAE folder with one ``key_part`` tensor set to NaN."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    nano = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights" / "vae"
    folder = tmp_path / f"nan-vae-{key_part}"
    folder.mkdir()
    for extra in nano.iterdir():
        if extra.name != "model.safetensors":
            (folder / extra.name).write_bytes(extra.read_bytes())
    state = load_file(str(nano / "model.safetensors"))
    key = next(k for k in state if key_part in k and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_roundtrip_with_nan_weights_stops_with_exit_4_and_writes_nothing(cli, tmp_path):
    """NaN weights once gave an all-black reconstruction and exit 0."""
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    for part, what in (("encoder", "the latents"), ("decoder", "the decoded image")):
        weights = _nan_vae(tmp_path, part)
        res = cli("vae", "roundtrip", str(src), "--weights", str(weights))
        assert res.code == 4, res.stderr
        assert f"{weights}: --weights: the VAE produced NaN or infinite values in {what}" in res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
        assert not (tmp_path / "in-roundtrip.png").exists()  # no black image
