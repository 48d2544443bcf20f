"""Spatial tiling and image helpers shared by the VAEs (Qwen-Image, FLUX.2).

* :func:`tiled_apply` runs a spatial network (a VAE decoder or encoder) on overlapping
  tiles and blends the tile outputs with linear ramps, so the memory of one pass is
  bounded by the tile size rather than the image size.
* :func:`needs_tiling` is the auto switch a recipe's threshold drives.
* :func:`pad_to_multiple` / :func:`crop_to` handle images whose sides are not multiples
  of the VAE's factor; :func:`roundtrip` encodes and decodes a PIL image with any VAE
  that has ``encode``/``decode`` and reports the PSNR (the ``vae roundtrip`` command).

Tiling is an approximation: every tile sees a zero-padded border instead of its true
neighbours (and the mid-block attention sees one tile only), so a tiled output differs
from the untiled one, most near tile seams. The linear blend hides the seams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

#: Default auto-tiling threshold in image pixels (H*W): a 1536^2 image still decodes in
#: one pass, a 2048^2 one is tiled. Untiled 2048^2 needs ~4.5 GiB of bf16 activations
#: for the Qwen-Image decoder (estimated on the meta device) plus the 65536-token attention.
DEFAULT_TILE_THRESHOLD_PIXELS = 1536 * 1536


def needs_tiling(h: int, w: int, threshold_pixels: int | None) -> bool:
    """True when an image of ``h x w`` pixels is above the auto-tiling threshold.

    ``threshold_pixels`` is an area in image pixels; ``None`` or ``<= 0`` disables tiling.
    """
    if threshold_pixels is None or threshold_pixels <= 0:
        return False
    return h * w > threshold_pixels


def _as_int(value: float, what: str) -> int:
    r = round(value)
    if abs(value - r) > 1e-6:
        raise ValueError(f"{what} = {value} is not a whole number of cells at this scale")
    return int(r)


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` cells covering ``size`` with at least ``overlap``.

    The last tile is shifted back so that it ends exactly at ``size`` (no ragged edge
    tile), which can make the last overlap wider than ``overlap``; the blend weights are
    normalised, so that is harmless. Starts are multiples of ``align``.
    """
    if tile >= size:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // align * align
    if not starts or starts[-1] < last:
        starts.append(last)
    if starts[-1] + tile < size:  # alignment pushed the last tile short of the edge
        raise ValueError(f"cannot cover {size} cells with tiles of {tile} aligned to {align}")
    return starts


def _ramp(length: int, ramp_in: int, ramp_out: int, device: Any, dtype: Any) -> "torch.Tensor":
    """1-D blend weights: rising over ``ramp_in`` cells, falling over ``ramp_out`` cells.

    Weights are (i + 0.5) / n inside a ramp, so they stay strictly positive and two
    facing ramps of the same width sum to exactly 1.
    """
    import torch

    w = torch.ones(length, device=device, dtype=dtype)
    if ramp_in > 0:
        w[:ramp_in] = (torch.arange(ramp_in, device=device, dtype=dtype) + 0.5) / ramp_in
    if ramp_out > 0:
        w[length - ramp_out:] = torch.minimum(
            w[length - ramp_out:],
            (torch.arange(ramp_out, 0, -1, device=device, dtype=dtype) - 0.5) / ramp_out,
        )
    return w


def tiled_apply(
    fn: Callable[["torch.Tensor"], "torch.Tensor"],
    x: "torch.Tensor",
    *,
    tile: int,
    overlap: int,
    scale: int | float,
    out_channels: int,
) -> "torch.Tensor":
    """Run ``fn`` on overlapping spatial tiles of ``x`` (B, C, H, W) and blend the results.

    ``tile`` and ``overlap`` are in ``x``'s cells (latent cells for a decoder, pixels for
    an encoder). ``scale`` is the output/input spatial ratio (8 for a decode, 1/8 for an
    encode); ``fn(x_tile)`` must return ``(B, out_channels, th*scale, tw*scale)``. Tile
    outputs are blended with linear ramps over the overlap (``overlap*scale`` output
    cells) where two tiles meet; image borders get full weight. The accumulation is in
    float32 and the result has the dtype of the first tile output.
    """
    import torch

    if x.ndim != 4:
        raise ValueError(f"tiled_apply expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if overlap < 0 or tile <= 0:
        raise ValueError(f"bad tiling: tile={tile}, overlap={overlap}")
    # Tiles must start on cells that map to whole output cells (e.g. multiples of 8 px
    # for an encoder with scale 1/8).
    align = 1 if scale >= 1 else _as_int(1 / scale, "1/scale")
    out_h, out_w = _as_int(h * scale, "height*scale"), _as_int(w * scale, "width*scale")
    th, tw = min(tile, h), min(tile, w)
    for v, what in ((th, "tile height"), (tw, "tile width"), (overlap, "overlap")):
        _as_int(v * scale, what)
        if v % align:
            raise ValueError(f"{what} ({v}) must be a multiple of {align} at scale {scale}")
    rows = tile_starts(h, th, overlap, align)
    cols = tile_starts(w, tw, overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)

    out: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    result_dtype = None
    for i, y0 in enumerate(rows):
        for j, x0 in enumerate(cols):
            y = fn(x[:, :, y0:y0 + th, x0:x0 + tw])
            oy, ox = _as_int(y0 * scale, "tile row"), _as_int(x0 * scale, "tile column")
            oh, ow = y.shape[-2], y.shape[-1]
            if y.shape[0] != b or y.shape[1] != out_channels or oh != round(th * scale) or ow != round(tw * scale):
                raise ValueError(
                    f"tile function returned {tuple(y.shape)}, expected "
                    f"({b}, {out_channels}, {round(th * scale)}, {round(tw * scale)})"
                )
            if out is None:
                result_dtype = y.dtype
                out = torch.zeros(b, out_channels, out_h, out_w, device=y.device, dtype=torch.float32)
                weight_sum = torch.zeros(1, 1, out_h, out_w, device=y.device, dtype=torch.float32)
            # Ramp widths: the actual overlap with the neighbouring tile, in output cells.
            up = (rows[i - 1] + th - y0) if i > 0 else 0
            down = (y0 + th - rows[i + 1]) if i + 1 < len(rows) else 0
            left = (cols[j - 1] + tw - x0) if j > 0 else 0
            right = (x0 + tw - cols[j + 1]) if j + 1 < len(cols) else 0
            wy = _ramp(oh, round(up * scale), round(down * scale), y.device, torch.float32)
            wx = _ramp(ow, round(left * scale), round(right * scale), y.device, torch.float32)
            wt = wy[:, None] * wx[None, :]
            out[:, :, oy:oy + oh, ox:ox + ow].addcmul_(y.float(), wt)
            weight_sum[:, :, oy:oy + oh, ox:ox + ow] += wt
            del y
    assert out is not None and weight_sum is not None
    out /= weight_sum
    return out.to(result_dtype)


# ---------------------------------------------------------------------------
# Sizes that are not multiples of the VAE factor

def pad_to_multiple(x: "torch.Tensor", multiple: int = 8, mode: str = "replicate") -> tuple["torch.Tensor", tuple[int, int]]:
    """Pad (B, C, H, W) on the bottom/right up to multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` for :func:`crop_to`. Edge
    replication (the default) keeps the border content plausible for the encoder.
    """
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def crop_to(x: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """Crop (B, C, H, W) back to ``size = (H, W)`` (top-left), undoing :func:`pad_to_multiple`."""
    h, w = size
    return x[..., :h, :w]


# ---------------------------------------------------------------------------
# PIL <-> tensors and the VAE round trip

def to_rgb(image: "Image.Image") -> tuple["Image.Image", str | None]:
    """Convert any PIL image to RGB; return it with a note saying what changed (or None).

    Transparent images are composited onto white (dropping the alpha channel would show
    whatever colour hides under transparent pixels).
    """
    from PIL import Image

    if image.mode == "RGB":
        return image, None
    mode = image.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
        return rgb, f"converted {mode} to RGB (transparency composited onto white)"
    return image.convert("RGB"), f"converted {mode} to RGB"


def pil_to_tensor(image: "Image.Image") -> "torch.Tensor":
    """An RGB PIL image to a float32 (1, 3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return (t / 127.5 - 1.0).unsqueeze(0)


def tensor_to_pil(x: "torch.Tensor", *, rounding: str = "round") -> "Image.Image":
    """A (1, 3, H, W) or (3, H, W) tensor in [-1, 1] to an RGB PIL image.

    ``rounding="truncate"`` reproduces the official Krea sampler (``(x*255).byte()``
    after ``clamp(-1,1)*0.5+0.5``); ``"round"`` matches diffusers' image processor.
    """
    import numpy as np
    from PIL import Image

    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_pil takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    v = (x.detach().float().clamp(-1, 1) * 0.5 + 0.5) * 255.0
    if rounding == "round":
        v = v.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'round' or 'truncate', not {rounding!r}")
    arr = v.clamp(0, 255).to("cpu").byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def psnr(a: "Image.Image", b: "Image.Image") -> float:
    """Peak signal-to-noise ratio in dB between two same-size RGB images (8-bit scale)."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {a.size} vs {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _vae_multiple(vae: Any) -> int:
    contract = getattr(vae, "contract", None)
    if contract is None:
        return 8
    return int(contract.factor) * int(getattr(contract, "patch", 1) or 1)


def _vae_device_dtype(vae: Any) -> tuple[Any, Any]:
    import torch

    try:
        p = next(vae.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu"), torch.float32


def roundtrip(vae: Any, image: "Image.Image", *, check: Callable[["torch.Tensor", str], None] | None = None,
              **codec_kwargs: Any) -> tuple["Image.Image", float]:
    """Encode then decode a PIL image with ``vae``; return the reconstruction and its PSNR.

    Works with any VAE whose ``encode(images in [-1,1])`` returns latents and whose
    ``decode(latents)`` returns images in [-1,1] (normalised or raw, as long as the two
    agree). Non-RGB images are converted to RGB first (see :func:`to_rgb`; call it
    yourself to show the note); the PSNR compares against that RGB image. Sides that
    are not multiples of the VAE's factor (``contract.factor * contract.patch``) are
    padded by edge replication and cropped back. ``codec_kwargs`` (e.g. ``tile=``) go
    to both ``encode`` and ``decode``. ``check(tensor, what)`` is called on the latents and
    on the decoded images before either is used (the ``vae roundtrip`` command stops on
    non-finite values there: NaN weights would otherwise give an all-black picture).
    """
    import torch

    rgb, _note = to_rgb(image)
    device, dtype = _vae_device_dtype(vae)
    x = pil_to_tensor(rgb).to(device=device, dtype=dtype)
    x, size = pad_to_multiple(x, _vae_multiple(vae))
    with torch.inference_mode():
        z = vae.encode(x, **codec_kwargs)
        if check is not None:
            check(z, "the latents")
        y = vae.decode(z, **codec_kwargs)
        if check is not None:
            check(y, "the decoded image")
    out = tensor_to_pil(crop_to(y, size))
    return out, psnr(rgb, out)
