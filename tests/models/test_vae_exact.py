"""The exact Qwen-Image VAE decode (``model.layout = "official"``) against diffusers 0.42.1.

The default decode folds the causal 3D convs into 2D convs (krea2kit.models.vae_qwen): equal
in exact arithmetic, but in bfloat16 a conv2d and diffusers' conv3d over two zero frames
round differently. With a base_dim-16 VAE that shows in the 8-bit pixels (measured 1-3
levels on CPU); the exact path (krea2kit.models.vae_qwen_exact) must give diffusers' bits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from krea2kit.contracts import LoadContext
from krea2kit.models.vae_qwen import load_qwen_vae
from krea2kit.sampling import to_pixels
from support.presets import QWEN_VAES

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLQwenImage  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_e2e"


def _oracle(seed: int) -> AutoencoderKLQwenImage:
    """The "nano" VAE (base_dim 16, z 16, official latent statistics), every tensor random."""
    ref = AutoencoderKLQwenImage(**QWEN_VAES["nano"].to_diffusers_kwargs()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * r if name.endswith("gamma") else 0.1 * r if name.endswith("bias")
                    else r / p[0].numel() ** 0.5)
    return ref


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    ref = _oracle(seed=1)
    folder = tmp_path_factory.mktemp("nano") / "vae"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage", **dict(ref.config)}))
    return ref, folder


def _reference(ref: AutoencoderKLQwenImage, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The official Krea 2 decode: cast, ``z * std + mean`` in the VAE dtype, diffusers decode."""
    model = AutoencoderKLQwenImage(**dict(ref.config)).eval()
    model.load_state_dict(ref.state_dict())
    model = model.to(dtype)
    cfg = QWEN_VAES["nano"]
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(dtype)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(dtype)
    with torch.no_grad():
        return model.decode(latents.to(dtype)[:, :, None] * std + mean).sample[:, :, 0]


def _pixels(images: torch.Tensor) -> np.ndarray:
    return np.stack([np.asarray(im) for im in to_pixels(images)]).astype(np.int16)


def _latents(seed: int, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [3, 4])
def test_bf16_exact_decode_is_bit_identical_and_the_fold_is_not(nano, seed):
    ref, folder = nano
    vae = load_qwen_vae(folder, dtype=torch.bfloat16)
    lat = _latents(seed)  # 128 x 128 px
    want = _reference(ref, lat, torch.bfloat16)
    assert (want.abs() < 0.999).float().mean() > 0.5  # not all clamp
    vae.exact_decode = True
    exact = vae.decode(lat, tile=None)
    assert exact.dtype == torch.bfloat16
    assert torch.equal(exact, want)
    assert np.array_equal(_pixels(exact), _pixels(want))
    # Why the exact path exists: the 2D fold rounds elsewhere in bf16 (measured on CPU: max
    # 3 levels, mean 0.18 at 128^2), though it stays close.
    vae.exact_decode = False
    fold = vae.decode(lat, tile=None)
    assert not torch.equal(fold, want)
    diff = np.abs(_pixels(fold) - _pixels(want))
    assert 0 < diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_fp32_both_paths_match_diffusers(nano):
    ref, folder = nano
    vae = load_qwen_vae(folder)
    lat = _latents(5, 12, 20)
    want = _reference(ref, lat, torch.float32)
    for exact in (True, False):
        vae.exact_decode = exact
        err = (vae.decode(lat, tile=None) - want).abs().max().item()
        assert err <= 1e-5, (exact, err)  # measured: exact 0 (bit-identical on CPU), fold ~2e-6


def test_exact_path_batches_like_single_images(nano):
    _, folder = nano
    vae = load_qwen_vae(folder, dtype=torch.bfloat16)
    vae.exact_decode = True
    lat = torch.cat([_latents(6, 8, 12), _latents(7, 8, 12)])
    both = vae.decode(lat, tile=None)
    assert torch.equal(both, torch.cat([vae.decode(lat[i:i + 1], tile=None) for i in range(2)]))


def test_tiles_keep_the_fold(nano):
    """The official pipeline never tiles (diffusers' use_tiling is off and the reference never
    turns it on), so a tiled decode has no reference to match: it keeps the fast fold."""
    _, folder = nano
    vae = load_qwen_vae(folder, dtype=torch.bfloat16)
    lat = _latents(8, 16, 16)
    vae.exact_decode = False
    fold_tiled = vae.decode(lat, tile=64)
    vae.exact_decode = True
    assert torch.equal(vae.decode(lat, tile=64), fold_tiled)
    vae.tile_pixels, vae.tile_overlap_pixels = 64, 16  # what tile=64 uses
    assert torch.equal(vae.decode(lat, tile="auto", tile_threshold=32 * 32), fold_tiled)


@pytest.mark.parametrize("layout, exact", [("official", True), ("compact", False)])
def test_the_part_follows_the_layout(nano, layout, exact):
    from krea2kit.parts.vae import load_qwen

    _, folder = nano
    part = load_qwen(None, LoadContext(role="vae", name="qwen-image", location=str(folder), dtype="bfloat16",
                                       layout=layout))
    assert part.module.exact_decode is exact


# A real CLI run that records the latents its VAE decodes, so diffusers can decode them too.
_RECORD_LATENTS = """
import sys, torch
from krea2kit.models import vae_qwen

real_decode = vae_qwen.QwenImageVAE.decode

def decode(self, latents, **kwargs):
    torch.save({"latents": latents.detach().cpu().clone(), "exact": self.exact_decode}, "latents.pt")
    return real_decode(self, latents, **kwargs)

vae_qwen.QwenImageVAE.decode = decode
from krea2kit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["official", "compact"])
def test_cli_official_layout_gives_diffusers_pixels_in_bf16(nano, isolated_env, tmp_path, layout):
    from PIL import Image

    ref, folder = nano
    recipe = (
        'schema = "krea2kit.recipe/1"\nseed = 7\n[[prompts]]\ntext = "a red fox"\n'
        "width = 128\nheight = 128\n[model]\n"
        f'preset = "krea2-nano-turbo"\ndtype = "bfloat16"\ndevice = "cpu"\nlayout = "{layout}"\n'
        "[model.weights]\n"
        f"dit = {json.dumps(str(FIXTURE / 'dit' / 'model.safetensors'))}\n"
        f"text_encoder = {json.dumps(str(FIXTURE / 'text_encoder'))}\n"
        f"vae = {json.dumps(str(folder))}\n"
        '[sampler]\nname = "euler"\nsteps = 2\n[output]\ndir = "out"\nname = "fox"\n'
    )
    (tmp_path / "r.toml").write_text(recipe)
    proc = subprocess.run([sys.executable, "-c", _RECORD_LATENTS, "run", "r.toml", "--json"], cwd=tmp_path,
                          env=isolated_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = torch.load(tmp_path / "latents.pt")
    assert saved["exact"] is (layout == "official")
    ours = np.asarray(Image.open(tmp_path / record["path"]).convert("RGB")).astype(np.int16)
    want = _pixels(_reference(ref, saved["latents"], torch.bfloat16))[0]
    if layout == "official":
        assert np.array_equal(ours, want)
    else:
        assert np.abs(ours - want).max() <= 4
