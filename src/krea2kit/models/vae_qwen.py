"""The Qwen-Image VAE (the Krea 2 latent space) as a native 2D network.

The published VAE (diffusers ``AutoencoderKLQwenImage``, fine-tuned from the Wan 2.1
video VAE) is a causal 3D conv net. For a single image (one frame) it is exactly a 2D
conv net (diffusers 0.42.1 ``autoencoder_kl_qwenimage.py``; checked against it in tests):

* a causal conv with temporal kernel 3 pads two zero frames in front, so on one frame
  only its last temporal slice sees data: ``conv2d(x, w[:, :, -1], padding=1)``;
* a 1x1x1 conv is ``w[:, :, 0]``;
* the ``time_conv`` of the temporal down/upsamplers is never run on the first frame
  (diffusers caches the frame or marks it ``"Rep"`` and skips the conv).

So the 3D kernels are folded to 2D when the weights load, the ``time_conv`` weights are
ignored, and the network runs at ~40% of the 3D formulation's FLOPs with none of its
padded copies or feature caches. Module names equal the diffusers checkpoint keys; the
Wan / ComfyUI layout (``encoder.downsamples...``) is renamed at load time. In bfloat16 the
fold rounds differently from the 3D convs (a few 8-bit levels), so ``exact_decode``
(``model.layout = "official"``) decodes with diffusers' arithmetic instead
(:mod:`krea2kit.models.vae_qwen_exact`).

Latent normalisation follows the official Krea 2 code (``krea-ai/krea-2``
``autoencoder.py``: ``decode`` does ``x * latents_std + latents_mean`` in the model dtype
before the VAE decoder); ``encode`` is its inverse, ``(z - mean) / std`` of the
posterior mean.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from krea2kit.errors import WeightsError
from krea2kit.models.contract import LatentContract
from krea2kit.models.tiling import DEFAULT_TILE_THRESHOLD_PIXELS, needs_tiling, tiled_apply

# Official Qwen-Image VAE latent statistics (= Wan 2.1 WanVAE mean/std): the defaults of
# diffusers 0.42.1 AutoencoderKLQwenImage and the Qwen/Qwen-Image vae/config.json.
QWEN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
QWEN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

#: F.normalize's clamp on the L2 norm (diffusers QwenImageRMS_norm uses F.normalize).
RMS_NORM_EPS = 1e-12
#: Above this size (bytes) of one query-key score matrix the mid-block attention runs in
#: query chunks. 1024^2 images give 16384 tokens: 1 GiB of fp32 scores unchunked.
DEFAULT_ATTN_SCORE_BYTES = 256 * 1024 * 1024
#: Default tile (image pixels) and overlap for tiled encode/decode. Each tile is one
#: 512^2 pass (~1/4 of a 1024^2 decode's memory); the 128 px overlap is blended linearly.
DEFAULT_TILE_PIXELS = 512
DEFAULT_TILE_OVERLAP_PIXELS = 128


# ---------------------------------------------------------------------------
# Config

@dataclass(frozen=True)
class QwenVAEConfig:
    """Architecture of the Qwen-Image VAE (names follow diffusers' config.json)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    # Only decides which downsamplers carry a (never used) time_conv; spelled as upstream.
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    input_channels: int = 3
    latents_mean: tuple[float, ...] = QWEN_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.attn_scales:
            raise ValueError("attn_scales must be empty: the Qwen-Image VAE has attention only in its mid blocks")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_downsample needs one entry per downsampling level (len(dim_mult) - 1)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim = {self.z_dim} entries")
        if self.base_dim * self.dim_mult[-1] % 2 or any(self.base_dim * m % 2 for m in self.dim_mult):
            raise ValueError("channel counts must be even (the upsamplers halve them)")

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def preset(cls, name: str) -> "QwenVAEConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown Qwen VAE preset {name!r}; choose one of {', '.join(PRESETS)}") from None

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "QwenVAEConfig":
        """Build from a diffusers ``vae/config.json`` (unknown keys are ignored)."""
        cls_name = cfg.get("_class_name")
        if cls_name and cls_name not in ("AutoencoderKLQwenImage", "AutoencoderKLWan"):
            raise WeightsError(f"config.json describes {cls_name}, not a Qwen-Image VAE (AutoencoderKLQwenImage)")
        base = cls()
        kwargs: dict[str, Any] = {}
        for f in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
                  "input_channels", "latents_mean", "latents_std"):
            if f in cfg and cfg[f] is not None:
                kwargs[f] = cfg[f]
        z = kwargs.get("z_dim", base.z_dim)
        if z != base.z_dim and ("latents_mean" not in kwargs or "latents_std" not in kwargs):
            kwargs.setdefault("latents_mean", (0.0,) * z)
            kwargs.setdefault("latents_std", (1.0,) * z)
        return replace(base, **kwargs)

    def to_diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' ``AutoencoderKLQwenImage`` (tests, benches)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


PRESETS: dict[str, QwenVAEConfig] = {
    # The official config (diffusers defaults == Qwen/Qwen-Image vae/config.json).
    "qwen-image": QwenVAEConfig(),
    # Real models only: the nano models' VAE reads its shape from its config.json; test
    # sizes are in tests/support/presets.py.
}


# ---------------------------------------------------------------------------
# Layers (names of submodules/parameters equal the diffusers keys)

class RMSNorm2d(nn.Module):
    """Channel RMS norm as diffusers' QwenImageRMS_norm: ``normalize(x) * sqrt(C) * gamma``.

    ``F.normalize`` divides by ``max(||x||_2, 1e-12)`` over channels; it runs in float32
    for half-precision inputs, as upstream, and the result is cast back before scaling.
    ``gamma`` is stored as (C, 1, 1); checkpoints hold (C, 1, 1, 1) or (C, 1, 1).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace=True`` overwrites ``x`` (an activation nobody else holds): same values,
        one full-size tensor less at the peak."""
        half = x.dtype in (torch.float16, torch.bfloat16)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32 if half else None)
        norm.clamp_min_(RMS_NORM_EPS)
        if inplace:
            # x / norm is computed in the promoted dtype (float32) and rounded once into
            # x's dtype: the same value as upstream's (x.float() / norm).to(dtype).
            y = x.div_(norm)
        else:
            y = (x.float() / norm).to(x.dtype) if half else x / norm
        # Same op order as upstream: (y * scale) * gamma.
        return y.mul_(self.scale).mul_(self.gamma)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResBlock(nn.Module):
    """``conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`` (dropout is 0 at inference)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm2d(in_dim)
        self.conv1 = _conv3x3(in_dim, out_dim)
        self.norm2 = RMSNorm2d(out_dim)
        self.conv2 = _conv3x3(out_dim, out_dim)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x stays alive for the shortcut; every other activation is overwritten in place.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h, inplace=True), inplace=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of one image (mid blocks only).

    q, k, v come in that channel order from one 1x1 conv; the scale is SDPA's default
    1/sqrt(C). Queries are processed in chunks when one score matrix would exceed
    ``max_score_bytes`` (or in chunks of ``query_chunk`` if set), which is exact: each
    query row's softmax only involves that row.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm2d(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.query_chunk: int | None = None
        self.max_score_bytes: int = DEFAULT_ATTN_SCORE_BYTES

    def _chunk(self, n: int, elem: int) -> int:
        if self.query_chunk:
            return max(1, min(n, self.query_chunk))
        per_row = n * max(elem, 4)  # softmax may run in fp32
        return max(1, min(n, self.max_score_bytes // per_row))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        # (b, n, 3c): a free view for channels-last activations, one copy otherwise.
        qkv = self.to_qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, n, 3 * c)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # (b, 1, n, c) each
        chunk = self._chunk(n, x.element_size())
        if chunk >= n:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            for s in range(0, n, chunk):
                out[:, :, s:s + chunk] = F.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v)
        del qkv, q, k, v
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels-last (b, c, h, w)
        return self.proj(out).add_(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then a stride-2 3x3 conv (``resample.1`` in the keys).

    The 3D variant's ``time_conv`` is never run on a single frame, so it is not built.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class _Nearest2x(nn.Module):
    # Upstream uses mode "nearest-exact"; for an exact x2 it picks the same pixels as
    # "nearest" (tests/models/test_vae_qwen.py compares with diffusers), and nearest copies
    # values, so the float32 round trip upstream does is a no-op.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv that halves the channels (``resample.1`` in the keys)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resample = nn.Sequential(_Nearest2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_dim)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: QwenVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = _conv3x3(cfg.input_channels, dims[0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Downsample(cout))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm2d(dims[-1])
        self.conv_out = _conv3x3(dims[-1], 2 * cfg.z_dim)  # mean || logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x, inplace=True), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: QwenVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        self.conv_in = _conv3x3(cfg.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous upsampler's conv halved the channels
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, upsample=i != len(cfg.dim_mult) - 1))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm2d(dims[-1])
        self.conv_out = _conv3x3(dims[-1], cfg.input_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x, inplace=True), inplace=True))


# ---------------------------------------------------------------------------
# The VAE

TileArg = int | str | None


class QwenImageVAE(nn.Module):
    """Qwen-Image VAE for single images: ``encode`` (B,3,H,W) in [-1,1] -> normalised
    latents (B,16,H/8,W/8); ``decode`` the inverse. ``encode_raw``/``decode_raw`` skip the
    latent normalisation (the diffusers ``AutoencoderKLQwenImage`` posterior mean / decode).

    Tiling (``tile=``): ``"auto"`` (default) tiles when the image area exceeds
    ``tile_threshold`` pixels (the attribute, default 1536^2, or the call's
    ``tile_threshold=``; ``None``/0 there disables auto tiling) with ``tile_pixels``-sized
    tiles (512 px, 128 px overlap); ``None``/``0``/``False`` never tiles; an int tiles with
    that tile side in image pixels (overlap a quarter of it). Tiled results are
    approximate near the seams. A batch runs one image at a time (``batch_slicing``).
    ``exact_decode = True`` makes untiled decodes redo diffusers' 3D decode arithmetic
    (bit-identical in fp32 and bf16 on CPU, tested; slower; tiles keep the fold: the
    official pipeline never tiles).
    The mid-block attention runs in query chunks when one score matrix would exceed
    256 MiB (see :meth:`set_attention_chunking`).
    """

    def __init__(self, config: QwenVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or QwenVAEConfig()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        self.contract = LatentContract(channels=cfg.z_dim, factor=cfg.factor, patch=1, normalization="mean-std")
        self.tile_threshold: int | None = DEFAULT_TILE_THRESHOLD_PIXELS
        self.tile_pixels: int = DEFAULT_TILE_PIXELS
        self.tile_overlap_pixels: int = DEFAULT_TILE_OVERLAP_PIXELS
        self.batch_slicing: bool = True
        self.channels_last: bool = False  # see set_channels_last (loaders turn it on)
        # True: untiled decodes redo diffusers' 3D arithmetic (bit-identical in bf16, 2-4.5x
        # slower; krea2kit.models.vae_qwen_exact); the pipeline sets it for layout "official".
        self.exact_decode: bool = False

    # -- properties -------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def factor(self) -> int:
        return self.config.factor

    def latent_stats(self, dtype: torch.dtype | None = None, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as (1, z, 1, 1) tensors: built in float32 and then cast, as the
        official code's buffers are (``torch.tensor(list)`` then ``module.to(dtype)``)."""
        device = device if device is not None else self.device
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        if dtype is not None:
            mean, std = mean.to(dtype), std.to(dtype)
        return mean, std

    def set_attention_chunking(self, *, query_chunk: int | None = None, max_score_bytes: int | None = None) -> None:
        """Force a query chunk size (tests) or change the score-matrix budget of both mid blocks."""
        for m in (self.encoder.mid_block.attentions[0], self.decoder.mid_block.attentions[0]):
            m.query_chunk = query_chunk
            if max_score_bytes is not None:
                m.max_score_bytes = max_score_bytes

    # -- tiling -----------------------------------------------------------
    def _tile_pixels(self, tile: TileArg, h_px: int, w_px: int, tile_threshold: int | None) -> int | None:
        """The tile side in pixels to use, or None for one pass."""
        if tile is None or tile is False or tile == 0:
            return None
        if isinstance(tile, str):
            if tile != "auto":
                raise ValueError(f"tile must be None, 'auto' or a tile size in pixels, not {tile!r}")
            threshold = self.tile_threshold if tile_threshold is None else tile_threshold
            return self.tile_pixels if needs_tiling(h_px, w_px, threshold) else None
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 2 * self.factor:
            raise ValueError(f"tile size must be an int >= {2 * self.factor} pixels, not {tile!r}")
        return tile

    def _overlap_for(self, tile_px: int) -> int:
        if tile_px == self.tile_pixels:
            return self.tile_overlap_pixels
        return tile_px // 4

    # -- raw (un-normalised) codec -------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.input_channels:
            raise ValueError(f"expected images (B, {self.config.input_channels}, H, W), got {tuple(x.shape)}")
        f = self.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"image size {x.shape[-1]}x{x.shape[-2]} is not a multiple of {f}; "
                "pad it first (krea2kit.models.tiling.pad_to_multiple) and crop the decode back"
            )

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"expected latents (B, {self.config.z_dim}, h, w), got {tuple(z.shape)}")

    def set_channels_last(self, enabled: bool = True) -> "QwenImageVAE":
        """Run the convolutions on channels-last (NHWC) activations and weights.

        On by default after loading: on CPU (oneDNN) it measured ~20% less time and ~33%
        less peak memory at 512^2 (no layout reorders around each conv); cuDNN also
        prefers NHWC for half-precision convs. Values are the same up to the kernels'
        summation order.
        """
        self.channels_last = enabled
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.device.type != "meta":
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _encode_pass(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self._layout(x))
        z = self.config.z_dim
        # Posterior mean = first z channels of quant_conv's output; only those are computed.
        return F.conv2d(h, self.quant_conv.weight[:z], self.quant_conv.bias[:z]).contiguous()

    def _decode_pass(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self._layout(z))).contiguous()

    def _exact_decode_pass(self, z: torch.Tensor) -> torch.Tensor:
        from krea2kit.models.vae_qwen_exact import decode_pass

        return decode_pass(self, z)

    def encode_raw(self, images: torch.Tensor, *, tile: TileArg = "auto", tile_threshold: int | None = None) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] -> posterior mean (B,z,H/8,W/8), not normalised."""
        self._check_image(images)
        x = images.to(device=self.device, dtype=self.dtype)
        tp = self._tile_pixels(tile, x.shape[-2], x.shape[-1], tile_threshold)
        f = self.factor
        with torch.no_grad():
            if tp is None:
                return self._per_sample(self._encode_pass, x)
            tp = max(2 * f, tp // f * f)
            ov = min(self._overlap_for(tp) // f * f, tp - f)
            return self._per_sample(
                lambda xi: tiled_apply(self._encode_pass, xi, tile=tp, overlap=ov, scale=1 / f,
                                       out_channels=self.config.z_dim), x)

    def decode_raw(self, latents: torch.Tensor, *, tile: TileArg = "auto", tile_threshold: int | None = None) -> torch.Tensor:
        """Raw latents (B,z,h,w) -> images (B,3,8h,8w) clamped to [-1,1] (diffusers decode)."""
        self._check_latents(latents)
        z = latents.to(device=self.device, dtype=self.dtype)
        f = self.factor
        tp = self._tile_pixels(tile, z.shape[-2] * f, z.shape[-1] * f, tile_threshold)
        with torch.no_grad():
            if tp is None:
                out = self._per_sample(self._exact_decode_pass if self.exact_decode else self._decode_pass, z)
            else:
                t = max(2, tp // f)
                ov = min(max(1, self._overlap_for(tp) // f), t - 1)
                out = self._per_sample(
                    lambda zi: tiled_apply(self._decode_pass, zi, tile=t, overlap=ov, scale=f,
                                           out_channels=self.config.input_channels), z)
            return out.clamp_(-1.0, 1.0)

    def _per_sample(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        # One image at a time bounds the activation memory by one image (diffusers'
        # "slicing"); the cost is a little batching efficiency.
        if not self.batch_slicing or x.shape[0] == 1:
            return fn(x)
        return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])

    # -- normalised codec (what the transformer sees) -------------------------
    def encode(self, images: torch.Tensor, *, tile: TileArg = "auto", tile_threshold: int | None = None) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] -> model latents ``(mean_z - latents_mean) / latents_std``."""
        z = self.encode_raw(images, tile=tile, tile_threshold=tile_threshold)
        mean, std = self.latent_stats(torch.float32, z.device)
        return ((z.float() - mean) / std).to(z.dtype)

    def decode(self, latents: torch.Tensor, *, tile: TileArg = "auto", tile_threshold: int | None = None) -> torch.Tensor:
        """Model latents (B,z,h,w) -> images (B,3,8h,8w) in [-1,1].

        As the official Krea 2 ``QwenAutoencoder.decode``: the latents are cast to the
        VAE dtype, then ``z * latents_std + latents_mean`` with the statistics in that dtype.
        """
        self._check_latents(latents)
        z = latents.to(device=self.device, dtype=self.dtype)
        mean, std = self.latent_stats(z.dtype, z.device)
        return self.decode_raw(z * std + mean, tile=tile, tile_threshold=tile_threshold)


# ---------------------------------------------------------------------------
# Loading

_PREFIXES = ("vae.", "first_stage_model.", "autoencoder.", "ae.", "model.")
_WAN_MARKERS = ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight")
_DIFFUSERS_MARKERS = ("decoder.mid_block.resnets.0.norm1.gamma", "encoder.conv_in.weight")
_RESIDUAL_RENAMES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
                     "residual.6": "conv2", "shortcut": "conv_shortcut"}


def wan_to_diffusers_key(key: str, num_res_blocks: int = 2) -> str:
    """Rename one Wan 2.1 / ComfyUI VAE key to the diffusers (= native) name.

    Table: diffusers ``convert_wan_vae_to_diffusers`` (``loaders/single_file_utils.py``). The decoder's
    flat ``upsamples`` list holds, per level, ``num_res_blocks + 1`` res blocks and one
    upsampler (none on the last level).
    """
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key
    parts = rest.split(".")
    if parts[0] == "conv1":
        parts[0] = "conv_in"
    elif parts[0] == "head":
        parts[:2] = [{"0": "norm_out", "2": "conv_out"}.get(parts[1], f"head.{parts[1]}")]
    elif parts[0] == "middle":
        parts[:2] = [{"0": "mid_block.resnets.0", "1": "mid_block.attentions.0",
                      "2": "mid_block.resnets.1"}.get(parts[1], f"middle.{parts[1]}")]
    elif parts[0] == "downsamples":
        parts[0] = "down_blocks"
    elif parts[0] == "upsamples":
        u = int(parts[1])
        per_level = num_res_blocks + 2
        level, r = divmod(u, per_level)
        parts[:2] = [f"up_blocks.{level}.resnets.{r}" if r <= num_res_blocks else f"up_blocks.{level}.upsamplers.0"]
    name = ".".join(parts)
    for old, new in _RESIDUAL_RENAMES.items():
        name = re.sub(rf"(^|\.){re.escape(old)}\.", rf"\g<1>{new}.", name)
    return f"{side}.{name}"


def detect_layout(keys: list[str]) -> str:
    """'diffusers' or 'wan' for Qwen-Image VAE keys (prefix stripped), else raise."""
    ks = set(keys)
    if all(m in ks for m in _WAN_MARKERS):
        return "wan"
    if all(m in ks for m in _DIFFUSERS_MARKERS):
        return "diffusers"
    raise ValueError("not a Qwen-Image VAE layout")


def _infer_config(shape: Any, keys: list[str], layout: str) -> QwenVAEConfig:
    """Read the architecture off the tensor shapes (diffusers names after renaming)."""
    base_dim = shape("encoder.conv_in.weight")[0]
    input_channels = shape("encoder.conv_in.weight")[1]
    z_dim = shape("post_quant_conv.weight")[0]
    idx = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.down_blocks.")})
    resample = [i for i in idx if f"encoder.down_blocks.{i}.resample.1.weight" in keys]
    num_res_blocks = resample[0] if resample else len(idx)
    levels = len(resample) + 1
    dim_mult = []
    for lvl in range(levels):
        first = lvl * (num_res_blocks + 1)
        dim_mult.append(shape(f"encoder.down_blocks.{first}.conv1.weight")[0] // base_dim)
    temporal = tuple(f"encoder.down_blocks.{i}.time_conv.weight" in keys for i in resample)
    kwargs: dict[str, Any] = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult),
                                  num_res_blocks=num_res_blocks, temperal_downsample=temporal,
                                  input_channels=input_channels)
    if z_dim != len(QWEN_LATENTS_MEAN):
        # No statistics are known for another latent width: identity normalisation.
        kwargs.update(latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
    return QwenVAEConfig(**kwargs)


def _fold_conv(t: torch.Tensor) -> torch.Tensor:
    # Causal 3D kernel on one frame: only the last temporal slice meets real data
    # (k_t=3 with two zero frames in front; k_t=1 has a single slice).
    return t[:, :, -1] if t.ndim == 5 else t


def _fold_gamma(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], 1, 1)


def _owned(fold: Any) -> Any:
    # safetensors hands out tensors backed by the file's memory map, and one such tensor
    # keeps the whole mapping (every page read, i.e. the 3x larger 3D kernels too)
    # resident. A folded VAE keeps a third of the file, so copy every tensor out.
    return lambda t: fold(t).clone(memory_format=torch.contiguous_format)


def load_qwen_vae(
    path: str | os.PathLike,
    *,
    config: QwenVAEConfig | str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> QwenImageVAE:
    """Load a Qwen-Image VAE from a diffusers ``vae/`` folder (config.json beside the
    weights) or a single ``.safetensors`` file in the diffusers or Wan/ComfyUI layout.

    The layout is detected from the keys (a ``vae.``/``first_stage_model.`` prefix is
    stripped); 3D kernels are folded to 2D and ``time_conv`` weights ignored. ``config``
    (a :class:`QwenVAEConfig` or preset name) wins over a config.json, which wins over
    the shapes in the file. Tensors keep their stored dtype unless ``dtype`` is given.
    """
    from krea2kit.models.weights import assign_weights, common_prefix, guess_checkpoint_kind, open_checkpoint

    p = os.fspath(path)
    if os.path.isdir(p) and os.path.isfile(os.path.join(p, "model_index.json")) and os.path.isdir(os.path.join(p, "vae")):
        p = os.path.join(p, "vae")  # a whole diffusers pipeline folder: use its vae/ component
    ckpt = open_checkpoint(p, what="Qwen-Image VAE weights")
    raw_keys = ckpt.keys()
    prefix = common_prefix(raw_keys, _PREFIXES)
    stripped = [k[len(prefix):] for k in raw_keys]
    try:
        layout = detect_layout(stripped)
    except ValueError:
        raise WeightsError(
            "not a Qwen-Image VAE (neither the diffusers AutoencoderKLQwenImage nor the Wan/ComfyUI key layout)",
            file=str(ckpt.path),
            hint=f"this file looks like {guess_checkpoint_kind(raw_keys)}",
        ) from None

    if isinstance(config, str):
        config = QwenVAEConfig.preset(config)
    # Wan keys need num_res_blocks to rename; take it from the config or infer it.
    if layout == "wan":
        nrb_guess = config.num_res_blocks if config else _wan_num_res_blocks(stripped)
        rename = lambda k: wan_to_diffusers_key(k, nrb_guess)  # noqa: E731
    else:
        rename = lambda k: k  # noqa: E731
    names = {rename(s): raw for s, raw in zip(stripped, raw_keys)}
    if config is None and ckpt.config:
        try:
            config = QwenVAEConfig.from_diffusers_config(ckpt.config)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"config.json does not describe a usable Qwen-Image VAE: {exc}",
                               file=str(ckpt.path), hint="pass config= (e.g. 'qwen-image')") from None
        except WeightsError as exc:
            exc.file = exc.file or str(ckpt.path)
            raise
    if config is None:
        try:
            config = _infer_config(lambda k: ckpt.shape(names[k]), list(names), layout)
        except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
            raise WeightsError(f"cannot read the VAE architecture from the tensor shapes ({exc})",
                               file=str(ckpt.path), hint="pass config= (e.g. 'qwen-image')") from None

    with torch.device("meta"):
        vae = QwenImageVAE(config)
    transforms = {}
    for name, p in vae.state_dict(keep_vars=True).items():
        fold = _fold_gamma if name.endswith(".gamma") else _fold_conv if p.ndim == 4 else (lambda t: t)
        transforms[name] = _owned(fold)
    assign_weights(
        vae,
        ckpt,
        key_map=lambda k: rename(k[len(prefix):]),
        transforms=transforms,
        dtype=dtype,
        device=device,
        ignore=lambda k: ".time_conv." in k,
        what=f"Qwen-Image VAE weights ({layout} layout)",
    )
    return vae.eval().requires_grad_(False).set_channels_last(channels_last)


def _wan_num_res_blocks(keys: list[str]) -> int:
    # Encoder: the first resample index in the flat downsamples list = res blocks per level.
    for i in range(64):
        if f"encoder.downsamples.{i}.resample.1.weight" in keys:
            return i
    return 2
