"""The FLUX.2 VAE (32-channel KL autoencoder with a batch-norm-normalised 2x2 patchify).

Architecture (facts from diffusers 0.42.1 ``AutoencoderKLFlux2`` + ``vae.py``
Encoder/Decoder, and BFL ``flux2/src/flux2/autoencoder.py``):

* an SD/FLUX.1-style f8 conv autoencoder: GroupNorm(eps 1e-6) + SiLU resnet blocks,
  one single-head attention block in each mid block, ``quant_conv`` 64->64 after the
  encoder (the posterior mean is its first 32 channels) and ``post_quant_conv`` 32->32
  before the decoder; no output clamp inside the VAE;
* model-space latents: the 32-channel posterior mean, patchified 2x2 to 128 channels in
  ``(c, pi, pj)`` order, normalised with the eval-mode running statistics of a
  ``BatchNorm2d(128, eps=1e-4, affine=False)``; krea2kit hands the normalised latents
  back unpatchified, as (B, 32, H/8, W/8) (:class:`LatentContract` ``patch=2``).

Module attribute names equal the diffusers checkpoint keys; BFL's ``ae.safetensors``
naming is mapped on load (:func:`load_flux2_vae`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from krea2kit.errors import WeightsError
from krea2kit.models.contract import LatentContract

# GroupNorm eps of every resnet / attention / output norm (diffusers Encoder/Decoder
# ``resnet_eps=1e-6``; BFL ``Normalize`` eps=1e-6).
GROUP_NORM_EPS = 1e-6
# BatchNorm eps of the latent normalisation (diffusers ``batch_norm_eps=1e-4``, BFL ``bn_eps``).
BATCH_NORM_EPS = 1e-4
# Largest query-by-key score block one attention chunk may hold (bytes). A 2048^2 image
# has 65,536 mid-block tokens: an unchunked single-head score matrix would take 16 GiB
# in fp32 (8 GiB in bf16); chunking the queries bounds it whatever kernel SDPA picks.
ATTENTION_SCORE_BUDGET_BYTES = 256 * 1024 * 1024
# The sub-pixel upsample folds its 3x3 kernel into four 2x2 ones on every call (~16*C^2
# work and memory); below this input area (h*w) the literal path is as fast.
SUBPIXEL_MIN_INPUT_PIXELS = 64 * 64
# Tiling defaults, in pixels. diffusers tiles FLUX.2 with 1024 px tiles and a 0.25
# overlap factor (``sample_size=1024``, ``tile_overlap_factor=0.25``).
DEFAULT_TILE_PIXELS = 1024
DEFAULT_TILE_OVERLAP_PIXELS = 256


# ---------------------------------------------------------------------------
# Config


@dataclass
class Flux2VAEConfig:
    """Shape of a FLUX.2 VAE (field names follow diffusers' ``AutoencoderKLFlux2`` config)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    # FLUX.2-small-decoder keeps the encoder and shrinks the decoder to (96, 192, 384, 384).
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = BATCH_NORM_EPS
    patch_size: tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            self.decoder_block_out_channels = tuple(int(c) for c in self.decoder_block_out_channels)
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str) -> "Flux2VAEConfig":
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise KeyError(f"unknown FLUX.2 VAE preset {name!r}; known: {', '.join(PRESETS)}") from None

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "Flux2VAEConfig":
        """Read a diffusers ``config.json`` dict (unknown entries such as ``_class_name``,
        ``sample_size``, ``act_fn`` or ``force_upcast`` are ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        act = cfg.get("act_fn", "silu")
        if act != "silu":
            raise WeightsError(f"unsupported FLUX.2 VAE activation {act!r} (only 'silu' exists)")
        for key in ("down_block_types", "up_block_types"):
            kinds = set(cfg.get(key) or ())
            allowed = {"DownEncoderBlock2D"} if key == "down_block_types" else {"UpDecoderBlock2D"}
            if kinds - allowed:
                raise WeightsError(f"unsupported FLUX.2 VAE {key}: {sorted(kinds - allowed)}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # black-forest-labs/FLUX.2-dev ae.safetensors / vae/config.json (diffusers defaults).
    "flux2": {},
    # black-forest-labs/FLUX.2-small-decoder config.json.
    "flux2-small-decoder": {"decoder_block_out_channels": (96, 192, 384, 384)},
    # Real models only (test sizes: tests/support/presets.py).
}


# ---------------------------------------------------------------------------
# Patchify and the batch-norm latent normalisation


class LatentBatchNorm(nn.Module):
    """The running statistics of the FLUX.2 ``bn`` layer (eval mode, no affine).

    Only ``running_mean`` and ``running_var`` are kept; ``num_batches_tracked`` is a
    training counter with no effect in eval mode (and absent from some files).
    """

    def __init__(self, num_features: int, eps: float = BATCH_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def stats(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Same order of operations as diffusers' Flux2Pipeline: std = sqrt(var + eps) in the
        # statistics' dtype, then both cast to the latents' dtype.
        mean = self.running_mean.to(device=device, dtype=dtype)
        std = torch.sqrt(self.running_var + self.eps).to(device=device, dtype=dtype)
        return mean, std


# ---------------------------------------------------------------------------
# Building blocks (attribute names = diffusers keys)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """``out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place activations and residual add: the block keeps at most two feature maps
        # of its size alive besides its input.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 conv (no conv padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _subpixel_kernels(w: torch.Tensor) -> torch.Tensor:
    """Fold "nearest x2 upsample, then 3x3 conv (padding 1)" into four 2x2 kernels.

    Output pixel (2i+a, 2j+b) of the upsampled conv only reads input rows {i-1, i}
    (a=0) or {i, i+1} (a=1), and likewise for columns; the 3x3 taps that land on the same
    input row/column are summed. Returns (4*O, C, 2, 2), phase index 2a+b, in fp32 (the
    sums are rounded once when cast back to the weight dtype).
    """
    w = w.float()
    # rows: a=0 -> (w0, w1+w2), a=1 -> (w0+w1, w2); same for columns.
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
    phases = []
    for r in rows:
        phases.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))
        phases.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))
    return torch.cat(phases, 0)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv.

    By default (``subpixel=True``) it runs as one 2x2 conv with four times the output
    channels on the low-resolution input, then interleaves the four phases: 16 instead
    of 36 multiply-adds per input pixel and channel pair, the same function up to fp32
    rounding of the folded weights (~1e-7 relative). ``subpixel=False`` (and inputs
    smaller than ``SUBPIXEL_MIN_INPUT_PIXELS``) use the literal upsample-then-conv of
    diffusers/BFL.
    """

    subpixel: bool = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if not self.subpixel or h * w < SUBPIXEL_MIN_INPUT_PIXELS:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        o = self.conv.out_channels
        kernel = _subpixel_kernels(self.conv.weight).to(x.dtype)
        bias = self.conv.bias.repeat(4)
        # Phase (a, b) at output (i, j) is this conv's value at (i + a, j + b).
        phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, bias)  # (B, 4*O, H+1, W+1)
        y = x.new_empty(b, o, 2 * h, 2 * w)
        for a in (0, 1):
            for bb in (0, 1):
                p = 2 * a + bb
                y[:, :, a::2, bb::2] = phases[:, p * o:(p + 1) * o, a:a + h, bb:bb + w]
        return y


class Attention(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual connection.

    q/k/v/out are Linear over channels (BFL stores them as 1x1 convs; reshaped on load).
    Queries are processed in chunks so the score block stays under
    ``ATTENTION_SCORE_BUDGET_BYTES`` whatever SDPA kernel runs.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        # None = choose from the score budget; an int forces a chunk size (tests).
        self.query_chunk: int | None = None

    def _chunk(self, batch: int, n: int, elem: int) -> int:
        if self.query_chunk is not None:
            return max(1, int(self.query_chunk))
        return max(1, ATTENTION_SCORE_BUDGET_BYTES // max(1, batch * n * elem))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        t = self.group_norm(x).view(b, c, n).transpose(1, 2)  # (B, N, C)
        q = self.to_q(t).unsqueeze(1)  # (B, 1, N, C): one head of width C
        k = self.to_k(t).unsqueeze(1)
        v = self.to_v(t).unsqueeze(1)
        del t
        chunk = self._chunk(b, n, q.element_size())
        if chunk >= n:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.empty_like(q)
            for s in range(0, n, chunk):
                out[:, :, s:s + chunk] = F.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v)
        del q, k, v
        out = self.to_out[0](out.squeeze(1))  # (B, N, C)
        return out.transpose(1, 2).reshape(b, c, h, w).add_(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups),
                                      ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2*latent, H/8, W/8), before ``quant_conv``."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """Latents (B, latent, h, w) after ``post_quant_conv`` -> image (B, 3, 8h, 8w)."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        ch, g = cfg.decoder_channels, cfg.norm_num_groups
        rev = list(reversed(ch))
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention)
        # Every level has one more resnet than the encoder (diffusers ``layers_per_block + 1``).
        self.up_blocks = nn.ModuleList([
            UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, upsample=i < len(rev) - 1)
            for i in range(len(rev))
        ])
        self.conv_norm_out = _group_norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


# ---------------------------------------------------------------------------
# The VAE


def _tiling():
    # Imported lazily: tiling is optional and lives in its own module.
    from krea2kit.models import tiling

    return tiling


class Flux2VAE(nn.Module):
    """The FLUX.2 VAE. ``encode``/``decode`` speak normalised model latents (B, 32, H/8, W/8);
    ``encode_raw``/``decode_raw`` speak the raw posterior-mean space."""

    def __init__(self, config: Flux2VAEConfig | None = None):
        super().__init__()
        cfg = config or Flux2VAEConfig()
        if len(cfg.decoder_channels) != len(cfg.block_out_channels):
            raise ValueError("decoder_block_out_channels must have as many levels as block_out_channels")
        if cfg.patch_size[0] != cfg.patch_size[1]:
            raise ValueError(f"only square latent patches are supported, got {cfg.patch_size}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.bn = LatentBatchNorm(c * math.prod(cfg.patch_size), eps=cfg.batch_norm_eps)
        self.contract = LatentContract(channels=c, factor=cfg.factor, patch=cfg.patch_size[0],
                                       normalization="batchnorm-patchified")
        # Area in image pixels above which ``tile="auto"`` tiles (None: never), the shared
        # default of ``krea2kit.models.tiling`` unless set (as the Qwen-Image VAE's).
        self.tile_threshold: int | None = _tiling().DEFAULT_TILE_THRESHOLD_PIXELS

    # -- helpers ---------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _tile_plan(self, h: int, w: int, tile: int | str | None) -> int | None:
        """Tile size in pixels, or None for an untiled pass."""
        if tile is None or tile is False:
            return None
        if tile == "auto":
            t = _tiling()
            # Shared default 1536^2 px: an untiled FLUX.2 decode at 2048^2 needs ~6 GiB of
            # bf16 activations (estimated by tracking live tensors on the meta device).
            if not t.needs_tiling(h, w, self.tile_threshold):
                return None
            return DEFAULT_TILE_PIXELS
        if isinstance(tile, bool) or not isinstance(tile, int):
            raise ValueError(f"tile must be None, 'auto' or a size in pixels, got {tile!r}")
        f = self.config.factor
        if tile <= 0 or tile % f:
            raise ValueError(f"tile must be a positive multiple of {f} pixels, got {tile}")
        return tile

    @staticmethod
    def _overlap(tile_px: int, factor: int) -> int:
        # diffusers' overlap factor 0.25, kept on the latent grid.
        ov = min(DEFAULT_TILE_OVERLAP_PIXELS, tile_px // 4)
        return ov - ov % factor

    # -- raw space -------------------------------------------------------

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        m = self.encoder(x)
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return m

    def _encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        # Posterior mode = mean = first half of the moments (diffusers DiagonalGaussianDistribution).
        return self._encode_moments(x)[:, : self.config.latent_channels]

    def _decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @torch.no_grad()
    def encode_raw(self, images: torch.Tensor, *, tile: int | str | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean (B, 32, H/8, W/8), unnormalised."""
        self._check_input(images, self.config.in_channels, "images")
        x = images.to(device=self.device, dtype=self.dtype)
        h, w = x.shape[-2:]
        tile_px = self._tile_plan(h, w, tile)
        if tile_px is None:
            return self._encode_mean(x).contiguous()
        f = self.config.factor
        if h % f or w % f:
            raise ValueError(f"tiled encode needs H and W divisible by {f}, got {h}x{w}")
        return _tiling().tiled_apply(self._encode_mean, x, tile=tile_px, overlap=self._overlap(tile_px, f),
                                     scale=1 / f, out_channels=self.config.latent_channels)

    @torch.no_grad()
    def decode_raw(self, z: torch.Tensor, *, tile: int | str | None = None) -> torch.Tensor:
        """Raw latents (B, 32, h, w) -> images (B, 3, 8h, 8w), not clamped."""
        self._check_input(z, self.config.latent_channels, "latents")
        z = z.to(device=self.device, dtype=self.dtype)
        f = self.config.factor
        h, w = z.shape[-2:]
        tile_px = self._tile_plan(h * f, w * f, tile)
        if tile_px is None:
            return self._decode_untiled(z)
        return _tiling().tiled_apply(self._decode_untiled, z, tile=tile_px // f,
                                     overlap=self._overlap(tile_px, f) // f, scale=f,
                                     out_channels=self.config.out_channels)

    # -- normalised model space -------------------------------------------

    def _stats_grid(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """BN stats shaped to broadcast over ``z`` viewed as (B, C, h/p, p, w/p, p).

        Applying the 128 per-(c, pi, pj) statistics on this view is element-for-element
        the same arithmetic as patchify -> normalise -> unpatchify, without the copies.
        """
        b, c, h, w = z.shape
        p = self.config.patch_size[0]
        if h % p or w % p:
            raise ValueError(
                f"latent height and width must be multiples of {p} for the FLUX.2 {p}x{p} patch "
                f"(images multiples of {p * self.config.factor} px), got {h}x{w}")
        mean, std = self.bn.stats(z.dtype, z.device)
        shape = (1, c, 1, p, 1, p)
        return mean.view(shape), std.view(shape), (b, c, h // p, p, w // p, p)

    def normalize(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> model latents: ``(patchify(z) - mean) / sqrt(var + eps)``, unpatchified."""
        mean, std, view = self._stats_grid(z_raw)
        return ((z_raw.reshape(view) - mean) / std).reshape(z_raw.shape)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model latents -> raw latents: ``unpatchify(patchify(z) * sqrt(var + eps) + mean)``."""
        mean, std, view = self._stats_grid(z)
        return (z.reshape(view) * std + mean).reshape(z.shape)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, tile: int | str | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, 32, H/8, W/8).

        H and W must be multiples of 16. ``tile``: None, "auto" or a tile size in pixels.
        """
        m = self.config.factor * self.config.patch_size[0]
        if images.ndim == 4 and (images.shape[-2] % m or images.shape[-1] % m):
            raise ValueError(f"image height and width must be multiples of {m} for FLUX.2 latents, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        return self.normalize(self.encode_raw(images, tile=tile))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile: int | str | None = None) -> torch.Tensor:
        """Normalised latents (B, 32, h, w) -> images (B, 3, 8h, 8w) around [-1, 1] (not clamped)."""
        self._check_input(latents, self.config.latent_channels, "latents")
        z = latents.to(device=self.device, dtype=self.dtype)
        return self.decode_raw(self.denormalize(z), tile=tile)

    @staticmethod
    def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")


# ---------------------------------------------------------------------------
# Loading


_DIFFUSERS_MARK = "decoder.up_blocks."
_BFL_MARK = "decoder.up."
_PREFIXES = ("vae.", "first_stage_model.", "ae.", "model.")
_ATTN_WEIGHT = re.compile(r"(en|de)coder\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _bfl_key_map(n_levels: int) -> Callable[[str], str | None]:
    """A function mapping one BFL ``ae.safetensors`` key to our (diffusers) key.

    Rules from diffusers' ``scripts/convert_flux2_to_diffusers.py``: the
    quant convs live inside encoder/decoder in BFL's file, ``block``/``nin_shortcut``/
    ``norm_out`` are renamed, and the decoder ``up`` list is stored lowest resolution last,
    so BFL ``up.{k}`` is our ``up_blocks.{n_levels - 1 - k}``.
    """
    rules: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
        (re.compile(r"^encoder\.quant_conv\.(.*)$"), lambda m: f"quant_conv.{m[1]}"),
        (re.compile(r"^decoder\.post_quant_conv\.(.*)$"), lambda m: f"post_quant_conv.{m[1]}"),
        (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$"),
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"),
        (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$"),
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$"),
         lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"),
        (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$"),
         lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(.*)$"),
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.norm\.(.*)$"),
         lambda m: f"{m[1]}.mid_block.attentions.0.group_norm.{m[2]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.([qkv])\.(.*)$"),
         lambda m: f"{m[1]}.mid_block.attentions.0.to_{m[2]}.{m[3]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.(.*)$"),
         lambda m: f"{m[1]}.mid_block.attentions.0.to_out.0.{m[2]}"),
        (re.compile(r"^(encoder|decoder)\.norm_out\.(.*)$"), lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
    ]

    def key_map(key: str) -> str | None:
        for pattern, make in rules:
            m = pattern.match(key)
            if m:
                return make(m).replace(".nin_shortcut.", ".conv_shortcut.")
        return key  # conv_in, conv_out, bn.* keep their names

    return key_map


def _detect_layout(keys: list[str], path: str) -> tuple[str, str]:
    """Return (layout, prefix): layout is "diffusers" or "bfl"; raise for anything else."""
    from krea2kit.models.weights import common_prefix, guess_checkpoint_kind

    prefix = common_prefix(keys, _PREFIXES)
    bare = [k[len(prefix):] for k in keys]
    has_bn = "bn.running_mean" in bare and "bn.running_var" in bare
    layout = None
    if any(k.startswith(_DIFFUSERS_MARK) for k in bare) and any(k.startswith("encoder.down_blocks.") for k in bare):
        layout = "diffusers"
    elif any(k.startswith(_BFL_MARK) for k in bare) and any(k.startswith("encoder.down.") for k in bare):
        layout = "bfl"
    kind = guess_checkpoint_kind(keys)
    hint = ("pass the FLUX.2 autoencoder: BFL's ae.safetensors (or ComfyUI flux2-vae.safetensors) "
            "or the diffusers vae/ folder of a FLUX.2 repository")
    if layout is None or (not has_bn and kind != "a VAE"):
        raise WeightsError(f"not a FLUX.2 VAE: this file looks like {kind}", file=path, hint=hint)
    if not has_bn:
        raise WeightsError(
            "not a FLUX.2 VAE: this is an SD/FLUX.1-style autoencoder without the FLUX.2 latent "
            "batch-norm statistics (bn.running_mean / bn.running_var)",
            file=path, hint=hint)
    return layout, prefix


def _count_indices(keys: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m[1]) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_config(shapes: dict[str, tuple[int, ...]], *, norm_num_groups: int = 32) -> Flux2VAEConfig:
    """A config from the shapes of a checkpoint in our (diffusers) key naming.

    GroupNorm groups are not stored in a checkpoint; the official value (32) is assumed.
    """
    keys = list(shapes)
    n = _count_indices(keys, r"^encoder\.down_blocks\.(\d+)\.")
    layers = _count_indices(keys, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    enc = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    dec_rev = tuple(shapes[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    dec = tuple(reversed(dec_rev))
    latent = shapes["decoder.conv_in.weight"][1]
    return Flux2VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        block_out_channels=enc,
        decoder_block_out_channels=None if dec == enc else dec,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=norm_num_groups,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in shapes,
        patch_size=(int(math.isqrt(shapes["bn.running_mean"][0] // latent)),) * 2,
    )


def load_flux2_vae(path: str | os.PathLike, *, config: Flux2VAEConfig | str | None = None,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux2VAE:
    """Load a FLUX.2 VAE from BFL's ``ae.safetensors`` or a diffusers ``vae/`` folder or file.

    The layout is detected from the keys. ``config``: a :class:`Flux2VAEConfig`, a preset
    name, or None (the folder's ``config.json`` if present, else inferred from the tensor
    shapes with 32 GroupNorm groups). ``dtype`` None keeps the stored dtype; ``dtype`` never
    applies to the batch-norm statistics (they keep their stored precision). Raises
    :class:`WeightsError` for a file that is not a FLUX.2 VAE.
    """
    from krea2kit.models.weights import assign_weights, open_checkpoint

    ckpt = open_checkpoint(path, what="FLUX.2 VAE weights")
    keys = ckpt.keys()
    layout, prefix = _detect_layout(keys, str(ckpt.path))
    if layout == "bfl":
        n_levels = _count_indices([k[len(prefix):] for k in keys], r"^encoder\.down\.(\d+)\.")
        to_ours = _bfl_key_map(n_levels)
    else:
        to_ours = lambda k: k  # noqa: E731

    def key_map(k: str) -> str | None:
        return to_ours(k[len(prefix):])

    mapped = {key_map(k): k for k in keys}
    if isinstance(config, str):
        cfg = Flux2VAEConfig.preset(config)
    elif config is not None:
        cfg = config
    elif ckpt.config is not None and layout == "diffusers":
        cfg = Flux2VAEConfig.from_diffusers(ckpt.config)
    else:
        try:
            cfg = infer_config({mk: ckpt.shape(ck) for mk, ck in mapped.items() if mk is not None})
        except (KeyError, IndexError, ZeroDivisionError) as exc:
            raise WeightsError(f"cannot infer the FLUX.2 VAE shape from the file (no {exc})",
                               file=str(ckpt.path), hint="pass config= (e.g. the 'flux2' preset)") from None

    with torch.device("meta"):
        model = Flux2VAE(cfg)

    # BFL stores the attention projections as 1x1 convs; ours are Linear.
    transforms = {}
    for mk, ck in mapped.items():
        if mk is not None and _ATTN_WEIGHT.search(mk) and len(ckpt.shape(ck)) == 4:
            transforms[mk] = lambda t: t.reshape(t.shape[0], t.shape[1])

    assign_weights(
        model, ckpt, key_map=key_map, transforms=transforms, dtype=dtype, device=device,
        keep_fp32=lambda name: name.startswith("bn."),
        ignore=lambda k: k[len(prefix):] == "bn.num_batches_tracked",
        what="FLUX.2 VAE weights",
    )
    return model.eval()
