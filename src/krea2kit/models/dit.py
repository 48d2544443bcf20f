"""The Krea 2 single-stream diffusion transformer (12.8B in the official config).

Module attribute names equal the official native checkpoint keys (``first``, ``tmlp.0``,
``blocks.N.attn.wq`` ...), so ``state_dict()`` of a full-size model lists exactly the 430
tensors of ``raw.safetensors`` / ``turbo.safetensors``. The numerics follow the official
``krea-ai/krea-2`` ``mmdit.py`` (commit db3984f):

* zero-centred RMSNorm computed in fp32 with weight ``1 + scale``;
* time embedding ``[cos, sin]`` of ``t * 1000 * exp(-ln(1e4) k / half)``; ``tmlp`` gives
  ``t``, ``tproj`` gives ``tvec`` shared by every block (each block adds its ``mod.lin``);
  the last layer modulates with ``t`` (not ``tvec``);
* sigmoid-gated grouped-query attention with per-head q/k RMSNorm and interleaved-pair
  3-axis RoPE (text at (0,0,0), image at (0,row,col));
* text fusion over the tapped encoder layers, then ``txtmlp``.

What it does differently from the official code, all exact (each proven by a test):

* attention uses ``torch.nn.functional.scaled_dot_product_attention`` with a key-padding
  mask (B,1,1,L) on any device and lets torch pick the kernel (the official code forces
  cuDNN, CUDA only, and pads the sequence to a multiple of 256 with a pairwise mask);
* padded text tokens are dropped before the transformer (:meth:`SingleStreamDiT.encode_text`),
  since masked keys contribute exactly nothing and text positions are all (0,0,0);
* text features (text fusion + ``txtmlp``) depend only on the text: compute them once per
  run with :meth:`SingleStreamDiT.encode_text` and pass ``txt_features=``;
* the RoPE table depends only on the sequence layout: compute it once with
  :meth:`SingleStreamDiT.rope_table` and pass ``rope=``;
* the last layer runs on the image tokens only (it is per-token).

Forward API (see :meth:`SingleStreamDiT.forward`)::

    tokens = patchify(latents, cfg.patch)                     # (B, N, C*p*p)
    feats = dit.encode_text(txt, txt_mask)                     # once per run
    rope = dit.rope_table(feats.length, gh, gw, device)        # once per run
    v = dit(tokens, t, grid_hw=(gh, gw), rope=rope, txt_features=feats)
    velocity = unpatchify(v, (gh, gw), cfg.patch)              # (B, C, H, W)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Numbers from the official code (krea-ai/krea-2 @ db3984f, mmdit.py / inference.py).
TIME_FACTOR = 1e3  # temb(): t in [0, 1] is scaled by 1000 before the sinusoids
TIME_PERIOD = 1e4  # temb(): the longest period
MLP_MULTIPLE = 128  # SwiGLU hidden size is rounded up to a multiple of 128
ROPE_THETA = 1e3  # SingleMMDiTConfig.theta (the PositionalEncoding default 1e2 is overridden)
NORM_EPS = 1e-5  # RMSNorm default eps


def swiglu_hidden(features: int, multiplier: int, multiple: int = MLP_MULTIPLE) -> int:
    """SwiGLU width: ``int(2F/3) * multiplier`` rounded up to ``multiple`` (official SwiGLU)."""
    hidden = int(2 * features / 3) * multiplier
    return multiple * ((hidden + multiple - 1) // multiple)


def rope_axes_for(head_dim: int) -> tuple[int, int, int]:
    """Head-dim split over the (frame, row, col) axes: [hd - 12(hd//16), 6(hd//16), 6(hd//16)]."""
    unit = head_dim // 16
    return (head_dim - 12 * unit, 6 * unit, 6 * unit)


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Krea 2 transformer. Field names follow the official ``SingleMMDiTConfig``.

    ``txtlayers`` is the number of tapped text-encoder layers fed in (12), not a depth; the
    text fusion depth is ``txt_layerwise_blocks`` + ``txt_refiner_blocks`` (2 + 2).
    ``mlp_hidden`` / ``txt_mlp_hidden`` / ``rope_axes`` override the values the official
    formulas give (only needed for checkpoints whose config says otherwise).
    """

    features: int = 6144
    heads: int = 48
    kvheads: int = 12
    layers: int = 28
    multiplier: int = 4
    patch: int = 2
    channels: int = 16
    tdim: int = 256
    txtdim: int = 2560
    txtheads: int = 20
    txtkvheads: int = 20
    txtlayers: int = 12
    txt_layerwise_blocks: int = 2
    txt_refiner_blocks: int = 2
    theta: float = ROPE_THETA
    eps: float = NORM_EPS
    mlp_hidden: int | None = None
    txt_mlp_hidden: int | None = None
    rope_axes: tuple[int, int, int] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rope_axes is not None:  # JSON gives lists; keep configs comparable and hashable
            object.__setattr__(self, "rope_axes", tuple(int(a) for a in self.rope_axes))
        self.validate()

    # Derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.features // self.heads

    @property
    def txt_head_dim(self) -> int:
        return self.txtdim // self.txtheads

    @property
    def in_features(self) -> int:
        """Width of one patchified latent token: channels * patch * patch."""
        return self.channels * self.patch * self.patch

    @property
    def mlp_dim(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else swiglu_hidden(self.features, self.multiplier)

    @property
    def txt_mlp_dim(self) -> int:
        return self.txt_mlp_hidden if self.txt_mlp_hidden is not None else swiglu_hidden(self.txtdim, self.multiplier)

    @property
    def axes(self) -> tuple[int, int, int]:
        return self.rope_axes if self.rope_axes is not None else rope_axes_for(self.head_dim)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid DiTConfig: {msg}")

        need(self.features % self.heads == 0, f"features={self.features} is not a multiple of heads={self.heads}")
        need(self.heads % self.kvheads == 0, f"heads={self.heads} is not a multiple of kvheads={self.kvheads}")
        need(self.txtdim % self.txtheads == 0, f"txtdim={self.txtdim} is not a multiple of txtheads={self.txtheads}")
        need(self.txtheads % self.txtkvheads == 0, f"txtheads={self.txtheads} is not a multiple of txtkvheads={self.txtkvheads}")
        need(self.tdim % 2 == 0, f"tdim={self.tdim} must be even")
        axes = self.axes
        need(len(axes) == 3 and sum(axes) == self.head_dim and all(a % 2 == 0 and a > 0 for a in axes),
             f"rope axes {axes} must be 3 positive even sizes summing to head_dim={self.head_dim}")

    # diffusers interop -----------------------------------------------------------
    @classmethod
    def from_diffusers(cls, config: dict) -> "DiTConfig":
        """Build from a diffusers ``Krea2Transformer2DModel`` ``config.json`` dict.

        Missing entries take diffusers' defaults (which are the official 12.8B model).
        ``in_channels`` is split as 16 latent channels x 2x2 patch when it is 64, else
        as ``in_channels / 4`` channels with patch 2 (the official patch size).
        """
        c = dict(config)
        head_dim = int(c.get("attention_head_dim", 128))
        heads = int(c.get("num_attention_heads", 48))
        features = head_dim * heads
        in_ch = int(c.get("in_channels", 64))
        patch = 2
        if in_ch % (patch * patch):
            raise ValueError(f"in_channels={in_ch} is not channels x 2 x 2")
        txtdim = int(c.get("text_hidden_dim", 2560))
        txtheads = int(c.get("text_num_attention_heads", 20))
        multiplier = 4
        mlp = int(c.get("intermediate_size", 16384))
        txt_mlp = int(c.get("text_intermediate_size", 6912))
        axes = tuple(int(a) for a in c.get("axes_dims_rope", rope_axes_for(head_dim)))
        return cls(
            features=features,
            heads=heads,
            kvheads=int(c.get("num_key_value_heads", 12)),
            layers=int(c.get("num_layers", 28)),
            multiplier=multiplier,
            patch=patch,
            channels=in_ch // (patch * patch),
            tdim=int(c.get("timestep_embed_dim", 256)),
            txtdim=txtdim,
            txtheads=txtheads,
            txtkvheads=int(c.get("text_num_key_value_heads", 20)),
            txtlayers=int(c.get("num_text_layers", 12)),
            txt_layerwise_blocks=int(c.get("num_layerwise_text_blocks", 2)),
            txt_refiner_blocks=int(c.get("num_refiner_text_blocks", 2)),
            theta=float(c.get("rope_theta", ROPE_THETA)),
            eps=float(c.get("norm_eps", NORM_EPS)),
            mlp_hidden=None if mlp == swiglu_hidden(features, multiplier) else mlp,
            txt_mlp_hidden=None if txt_mlp == swiglu_hidden(txtdim, multiplier) else txt_mlp,
            rope_axes=None if axes == rope_axes_for(head_dim) else axes,  # type: ignore[arg-type]
        )

    def to_diffusers(self) -> dict:
        """The equivalent diffusers ``Krea2Transformer2DModel`` constructor arguments."""
        return {
            "in_channels": self.in_features,
            "num_layers": self.layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kvheads,
            "intermediate_size": self.mlp_dim,
            "timestep_embed_dim": self.tdim,
            "text_hidden_dim": self.txtdim,
            "num_text_layers": self.txtlayers,
            "text_num_attention_heads": self.txtheads,
            "text_num_key_value_heads": self.txtkvheads,
            "text_intermediate_size": self.txt_mlp_dim,
            "num_layerwise_text_blocks": self.txt_layerwise_blocks,
            "num_refiner_text_blocks": self.txt_refiner_blocks,
            "axes_dims_rope": list(self.axes),
            "rope_theta": self.theta,
            "norm_eps": self.eps,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count, computed without building the model."""
        f, hd, thd = self.features, self.head_dim, self.txt_head_dim

        def block(d: int, heads: int, kv: int, hdim: int, mlp: int) -> int:
            return 2 * d + 3 * d * d + 2 * d * kv * hdim + 2 * hdim + 3 * d * mlp

        main = self.layers * (6 * f + block(f, self.heads, self.kvheads, hd, self.mlp_dim))
        txt = (self.txt_layerwise_blocks + self.txt_refiner_blocks) * block(
            self.txtdim, self.txtheads, self.txtkvheads, thd, self.txt_mlp_dim) + self.txtlayers
        top = (self.in_features * f + f) + (self.tdim * f + f + f * f + f) + (f * 6 * f + 6 * f)
        top += self.txtdim + (self.txtdim * f + f) + (f * f + f)
        top += f + (f * self.in_features + self.in_features) + 2 * f
        return main + txt + top


# The official 12.8B config (inference.py `single_mmdit_large_wide`); Raw and Turbo share it.
_OFFICIAL = DiTConfig()

# Real models only (test sizes: tests/support/presets.py; bench sizes: bench/dit_sizes.py).
PRESETS: dict[str, DiTConfig] = {
    "krea2-raw": _OFFICIAL,
    "krea2-turbo": replace(_OFFICIAL),
}


def get_preset(name: str) -> DiTConfig:
    """A named config from :data:`PRESETS` (a model preset's ``dit_config``); an unknown
    name is the preset's mistake, reported with the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        from krea2kit.errors import PluginError

        raise PluginError(f"the model preset names transformer config {name!r}, which the built-in "
                          f"transformer does not know; known: {', '.join(PRESETS)}", key="dit_config",
                          hint='use one of those, or "" to read the config from the weights') from None


# ---------------------------------------------------------------------------
# Layout helpers

def patchify(latents: Tensor, patch: int = 2) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p * W/p, C*p*p) tokens, channel order ``(c ph pw)``."""
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {patch}")
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, grid_hw: tuple[int, int], patch: int = 2) -> Tensor:
    """(B, gh*gw, C*p*p) tokens -> (B, C, gh*p, gw*p) latents (inverse of :func:`patchify`)."""
    b, n, d = tokens.shape
    gh, gw = grid_hw
    if n != gh * gw or d % (patch * patch):
        raise ValueError(f"{n} tokens of width {d} do not fit a {gh}x{gw} grid with patch {patch}")
    c = d // (patch * patch)
    x = tokens.reshape(b, gh, gw, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * patch, gw * patch)


def image_positions(grid_hw: tuple[int, int], device=None) -> Tensor:
    """(gh*gw, 3) RoPE positions of the image tokens: (0, row, col), row-major like patchify."""
    gh, gw = grid_hw
    pos = torch.zeros(gh, gw, 3, dtype=torch.float64, device=device)
    pos[..., 1] = torch.arange(gh, dtype=torch.float64, device=device)[:, None]
    pos[..., 2] = torch.arange(gw, dtype=torch.float64, device=device)[None, :]
    return pos.reshape(gh * gw, 3)


class Rope(NamedTuple):
    """Precomputed RoPE factors for one sequence layout: ``cos``/``sin`` of shape (L, 1, head_dim),
    fp32, each angle repeated for its adjacent pair; ``txt_len`` text rows come first."""

    cos: Tensor
    sin: Tensor
    txt_len: int

    @property
    def length(self) -> int:
        return self.cos.shape[0]


def rope_from_positions(pos: Tensor, axes: tuple[int, ...], theta: float, txt_len: int = 0) -> Rope:
    """RoPE factors for positions ``pos`` (L, n_axes), as the official ``rope()``: the
    frequencies ``theta ** -(2i/d)`` and the angles are formed in float64, then cast to fp32."""
    pos = pos.to(torch.float64)
    angles = []
    for i, d in enumerate(axes):
        omega = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d))
        angles.append(pos[:, i, None] * omega)
    ang = torch.cat(angles, dim=-1)  # (L, hd/2)
    cos = torch.cos(ang).float().repeat_interleave(2, dim=-1)
    sin = torch.sin(ang).float().repeat_interleave(2, dim=-1)
    return Rope(cos[:, None, :], sin[:, None, :], txt_len)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate adjacent pairs of ``x`` (B, L, H, D) in fp32, return in ``x``'s dtype.

    ``(x0, x1) -> (cos*x0 - sin*x1, sin*x0 + cos*x1)``: the same products and sums as the
    official ``ropeapply`` (bit-identical in fp32).
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * rope.cos + rotated * rope.sin).to(x.dtype)


class TextFeatures(NamedTuple):
    """Text tokens after text fusion and ``txtmlp``: ``tokens`` (B, L, features) in the model's
    compute dtype; ``mask`` (B, L) bool marking valid tokens, or ``None`` when all are valid."""

    tokens: Tensor
    mask: Tensor | None

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def expand(self, batch: int) -> "TextFeatures":
        """Repeat a batch-1 set of features to ``batch`` rows (no copy)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"text features have batch {self.batch}, cannot broadcast to {batch}")
        mask = None if self.mask is None else self.mask.expand(batch, -1)
        return TextFeatures(self.tokens.expand(batch, -1, -1), mask)

    @staticmethod
    def cat(parts: "list[TextFeatures]") -> "TextFeatures":
        """Stack along the batch, padding shorter ones (masked) to the longest."""
        length = max(p.length for p in parts)
        tokens, masks = [], []
        for p in parts:
            b, n = p.batch, p.length
            m = p.mask if p.mask is not None else torch.ones(b, n, dtype=torch.bool, device=p.tokens.device)
            if n < length:
                p_tokens = F.pad(p.tokens, (0, 0, 0, length - n))
                m = F.pad(m, (0, length - n), value=False)
            else:
                p_tokens = p.tokens
            tokens.append(p_tokens)
            masks.append(m)
        mask = torch.cat(masks)
        return TextFeatures(torch.cat(tokens), None if bool(mask.all()) else mask)


# ---------------------------------------------------------------------------
# Layers (attribute names = native checkpoint keys)

class Linear(nn.Linear):
    """``nn.Linear`` that runs in its weight's dtype and returns the input's dtype.

    The official file stores some linears in fp32 and the blocks in bf16; with this the
    activations stay in one compute dtype whatever mix of dtypes was loaded.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype == w.dtype:
            return F.linear(x, w, self.bias)
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: fp32 computation, weight ``1 + scale``, result in the input dtype."""

    def __init__(self, features: int, eps: float = NORM_EPS):
        super().__init__()
        self.features = features
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(features, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (self.features,), weight=self.scale.float() + 1.0, eps=self.eps)
        return y.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.qnorm = RMSNorm(head_dim, eps)
        self.knorm = RMSNorm(head_dim, eps)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q (B,H,L,D), k/v (B,Hkv,L,D) -> (B,H,L,D); grouped KV heads per :data:`GQA_NATIVE_ON_CPU`."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if GQA_NATIVE_ON_CPU and q.device.type == "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# Grouped KV heads: ``enable_gqa=True`` on CPU, repeated K/V heads elsewhere (same results).
# CPU, torch 2.13, bench/bench_dit.py (B=2, 8/2 heads, 1069 tokens, best of 8): enable_gqa was
# faster in 5 of 6 runs on a shared machine (119 vs 143 ms with the key-padding mask, 116 vs
# 136 ms without; 192 vs 184 ms in the one other run). CUDA: enable_gqa together with a mask
# falls back to the math kernel (diffusers PR #14523: 9.02 GiB / 26.7 ms -> 0.16 GiB / 4.1 ms
# per call at 1024^2 with repeated heads), so repeat there.
GQA_NATIVE_ON_CPU = True


class Attention(nn.Module):
    """Sigmoid-gated GQA self-attention with per-head q/k RMSNorm and optional RoPE."""

    def __init__(self, dim: int, heads: int, kvheads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.kvheads = kvheads
        self.head_dim = dim // heads
        self.wq = Linear(dim, self.head_dim * heads, bias=False)
        self.wk = Linear(dim, self.head_dim * kvheads, bias=False)
        self.wv = Linear(dim, self.head_dim * kvheads, bias=False)
        self.gate = Linear(dim, dim, bias=False)
        self.qknorm = QKNorm(self.head_dim, eps)
        self.wo = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, rope: Rope | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        q = self.qknorm.qnorm(self.wq(x).view(b, n, self.heads, self.head_dim))
        k = self.qknorm.knorm(self.wk(x).view(b, n, self.kvheads, self.head_dim))
        v = self.wv(x).view(b, n, self.kvheads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        gate = self.gate(x)
        if torch.is_grad_enabled():
            out = out * torch.sigmoid(gate)
        else:  # same rounding, no extra (B, L, F) buffer
            out = out.mul_(gate.sigmoid_())
        return self.wo(out)


class SwiGLU(nn.Module):
    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.gate = Linear(features, hidden, bias=False)
        self.up = Linear(features, hidden, bias=False)
        self.down = Linear(hidden, features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.down(F.silu(self.gate(x)) * self.up(x))
        h = F.silu(self.gate(x), inplace=True)
        return self.down(h.mul_(self.up(x)))


class TextFusionBlock(nn.Module):
    """Pre-norm block without modulation or RoPE (text fusion)."""

    def __init__(self, dim: int, heads: int, kvheads: int, hidden: int, eps: float):
        super().__init__()
        self.prenorm = RMSNorm(dim, eps)
        self.postnorm = RMSNorm(dim, eps)
        self.attn = Attention(dim, heads, kvheads, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.prenorm(x), mask=mask)
        return x + self.mlp(self.postnorm(x))


class TextFusion(nn.Module):
    """Fuses the tapped text-encoder layers: per-token attention across the taps, a learned
    projection of the taps to one, then attention across tokens (with the text mask)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()

        def make() -> TextFusionBlock:
            return TextFusionBlock(cfg.txtdim, cfg.txtheads, cfg.txtkvheads, cfg.txt_mlp_dim, cfg.eps)

        self.layerwise_blocks = nn.ModuleList([make() for _ in range(cfg.txt_layerwise_blocks)])
        self.projector = Linear(cfg.txtlayers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([make() for _ in range(cfg.txt_refiner_blocks)])

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, taps, d = x.shape
        x = x.reshape(b * n, taps, d)
        for block in self.layerwise_blocks:
            x = block(x)
        # (b, n, taps, d) -> (b, n, d, taps) -> mix taps -> (b, n, d), as the official einops path.
        x = self.projector(x.reshape(b, n, taps, d).permute(0, 1, 3, 2)).squeeze(-1)
        for block in self.refiner_blocks:
            x = block(x, mask=mask)
        return x


class Modulation(nn.Module):
    """Per-block learned offsets added to the shared ``tvec`` (native key ``mod.lin``, (6F,))."""

    def __init__(self, features: int):
        super().__init__()
        self.lin = nn.Parameter(torch.zeros(6 * features))


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        f = cfg.features
        self.mod = Modulation(f)
        self.prenorm = RMSNorm(f, cfg.eps)
        self.postnorm = RMSNorm(f, cfg.eps)
        self.attn = Attention(f, cfg.heads, cfg.kvheads, cfg.eps)
        self.mlp = SwiGLU(f, cfg.mlp_dim)

    def forward(self, x: Tensor, tvec: Tensor, rope: Rope | None, mask: Tensor | None) -> Tensor:
        mod = (tvec + self.mod.lin).to(x.dtype)
        prescale, preshift, pregate, postscale, postshift, postgate = mod.chunk(6, dim=-1)
        a = self.attn((1 + prescale) * self.prenorm(x) + preshift, rope, mask)
        x = _gated_add(x, pregate, a)
        m = self.mlp((1 + postscale) * self.postnorm(x) + postshift)
        return _gated_add(x, postgate, m)


def _gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """``x + gate * y`` with the official rounding; in place when no autograd is recording."""
    if torch.is_grad_enabled():
        return x + gate * y
    return x.add_(y.mul_(gate))


class SimpleModulation(nn.Module):
    """Last-layer learned (2, F) offsets added to ``t`` (native key ``last.modulation.lin``)."""

    def __init__(self, features: int):
        super().__init__()
        self.lin = nn.Parameter(torch.zeros(2, features))


class LastLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.features, cfg.eps)
        self.linear = Linear(cfg.features, cfg.in_features, bias=True)
        self.modulation = SimpleModulation(cfg.features)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        # t (B, 1, F) + lin (2, F) -> (B, 2, F): scale, shift (official SimpleModulation).
        scale, shift = (t + self.modulation.lin[None]).to(x.dtype).chunk(2, dim=1)
        return self.linear((1 + scale) * self.norm(x) + shift)


def time_embedding(t: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """(B,) times in [0, 1] -> (B, 1, dim) ``[cos, sin]`` embedding (official ``temb``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(TIME_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_FACTOR)[:, None, None] * freqs
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1).to(dtype)


class SingleStreamDiT(nn.Module):
    """The Krea 2 transformer. Build with a :class:`DiTConfig`; load with
    :func:`krea2kit.models.dit_loader.load_dit`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        f = config.features
        self.first = Linear(config.in_features, f, bias=True)
        self.blocks = nn.ModuleList([SingleStreamBlock(config) for _ in range(config.layers)])
        self.tmlp = nn.Sequential(Linear(config.tdim, f), nn.GELU(approximate="tanh"), Linear(f, f))
        self.txtfusion = TextFusion(config)
        self.txtmlp = nn.Sequential(
            RMSNorm(config.txtdim, config.eps), Linear(config.txtdim, f), nn.GELU(approximate="tanh"), Linear(f, f)
        )
        self.last = LastLayer(config)
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), Linear(f, 6 * f))

    # -- properties ---------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the activations: that of the block matmul weights (bf16 for the official file)."""
        ref = self.blocks[0].attn.wq.weight if len(self.blocks) else self.first.weight
        return ref.dtype

    @property
    def device(self) -> torch.device:
        return self.first.weight.device

    # -- per-run precomputation ------------------------------------------------------
    def encode_text(self, txt: Tensor, txt_mask: Tensor | None = None, *, drop_padding: bool = True) -> TextFeatures:
        """Text fusion + ``txtmlp`` on (B, L, taps, txtdim) tapped hidden states.

        Depends on the text only (not on t): call once per run. With ``drop_padding`` the
        masked tokens are removed first (valid tokens keep their order; rows are padded to
        the longest valid count, masked), which is exact: padded tokens are masked keys and
        every text token sits at RoPE position (0, 0, 0).
        """
        cfg = self.config
        if txt.ndim != 4 or txt.shape[2] != cfg.txtlayers or txt.shape[3] != cfg.txtdim:
            raise ValueError(f"text must be (B, L, {cfg.txtlayers}, {cfg.txtdim}), got {tuple(txt.shape)}")
        mask = None
        if txt_mask is not None:
            mask = txt_mask.to(device=txt.device, dtype=torch.bool)
            if mask.shape != txt.shape[:2]:
                raise ValueError(f"text mask shape {tuple(mask.shape)} does not match text {tuple(txt.shape[:2])}")
            counts = mask.sum(dim=1)
            if bool((counts == 0).any()):
                raise ValueError("every prompt needs at least one valid text token (the mask of one row is all False)")
            if bool(mask.all()):
                mask = None
            elif drop_padding:
                keep = int(counts.max())
                # Stable sort puts each row's valid tokens first, in their original order.
                order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :keep]
                txt = torch.gather(txt, 1, order[:, :, None, None].expand(-1, -1, txt.shape[2], txt.shape[3]))
                mask = torch.arange(keep, device=txt.device)[None, :] < counts[:, None]
                if bool(mask.all()):
                    mask = None
        x = txt.to(self.compute_dtype)
        x = self.txtfusion(x, mask=None if mask is None else mask[:, None, None, :])
        return TextFeatures(self.txtmlp(x), mask)

    def rope_table(self, txt_len: int, h: int, w: int, device=None, *, pad_to: int | None = None) -> Rope:
        """RoPE factors for ``[txt_len text tokens | h x w image patches]``: once per run.

        ``pad_to``: also cover the zero-position padding rows that :meth:`forward` adds to
        reach a multiple of ``pad_to`` (the official layout).
        """
        parts = [torch.zeros(txt_len, 3, dtype=torch.float64, device=device), image_positions((h, w), device)]
        extra = padding_for(txt_len + h * w, pad_to)
        if extra:
            parts.append(torch.zeros(extra, 3, dtype=torch.float64, device=device))
        return rope_from_positions(torch.cat(parts), self.config.axes, self.config.theta, txt_len)

    def time_vectors(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) times -> ``t_emb`` (B,1,F) for the last layer and ``tvec`` (B,1,6F) for the blocks.

        Computed once per distinct time and gathered: a CFG batch (cond and uncond share t)
        then runs the time MLP on the same rows as a single pass would. Small-M matmuls
        round differently with the batch size on CPU (1e-6), this keeps the two equal.
        """
        uniq, inverse = torch.unique(t, return_inverse=True)
        emb = time_embedding(uniq, self.config.tdim, self.compute_dtype)
        t_emb = self.tmlp(emb)
        tvec = self.tproj(t_emb)
        if uniq.numel() == t.numel() and bool((inverse == torch.arange(t.numel(), device=t.device)).all()):
            return t_emb, tvec
        return t_emb[inverse], tvec[inverse]

    # -- forward ------------------------------------------------------------------
    def forward(
        self,
        img: Tensor,
        t: Tensor | float,
        txt: Tensor | None = None,
        txt_mask: Tensor | None = None,
        grid_hw: tuple[int, int] | None = None,
        *,
        rope: Rope | None = None,
        txt_features: TextFeatures | None = None,
        pad_to: int | None = None,
        refs: Any = None,
    ) -> Tensor:
        """Velocity for the image tokens.

        img: (B, N, C*p*p) patchified latents (:func:`patchify`), N = gh * gw.
        t: (B,) tensor or a float, flow time in [0, 1] (1 = noise). It is used as given;
            the official sampler passes it in the model dtype (the denoiser does the same).
        txt, txt_mask: (B, L, taps, txtdim) tapped text hidden states and a (B, L) bool
            mask of valid tokens; ignored when ``txt_features`` is given.
        grid_hw: (gh, gw) patch grid of the image; needed unless ``rope`` is given.
        rope: from :meth:`rope_table` for this text length and grid (computed if None).
        txt_features: from :meth:`encode_text` (computed from ``txt`` if None).
        pad_to: append masked zero tokens (RoPE position 0) until the sequence length is a
            multiple of this, as the official forward does (256). Real tokens never attend
            to them, so in exact arithmetic nothing changes; in bf16 the attention kernels
            round by sequence length, so this is what reproduces the official pixels.
        refs: reference images (:mod:`krea2kit.references`): an object whose
            ``extend(dit, x, tvec, rope, mask)`` appends their tokens after everything else
            and returns the sequence, per-token ``tvec``, RoPE table and attention mask to
            use; their outputs are dropped like the padding's. ``None`` (the default) runs
            exactly the code above, so a run without references is unchanged bit for bit.
        Returns (B, N, C*p*p) in the compute dtype.
        """
        dt = self.compute_dtype
        b, n, _ = img.shape
        if txt_features is None:
            if txt is None:
                raise ValueError("pass txt (and txt_mask) or txt_features")
            txt_features = self.encode_text(txt, txt_mask)
        feats = txt_features.expand(b)
        txt_len = feats.length
        if rope is None:
            if grid_hw is None:
                raise ValueError("pass grid_hw=(rows, cols) of the patch grid, or a precomputed rope")
            if grid_hw[0] * grid_hw[1] != n:
                raise ValueError(f"grid {grid_hw} does not hold {n} image tokens")
            rope = self.rope_table(txt_len, grid_hw[0], grid_hw[1], img.device, pad_to=pad_to)
        extra = padding_for(txt_len + n, pad_to)
        if rope.length != txt_len + n + extra or rope.txt_len != txt_len:
            raise ValueError(f"rope table is for {rope.txt_len}+{rope.length - rope.txt_len} tokens, "
                             f"the input has {txt_len}+{n}")
        if not torch.is_tensor(t):
            t = torch.full((b,), float(t), device=img.device)
        elif t.ndim == 0:
            t = t.reshape(1).expand(b)
        t_emb, tvec = self.time_vectors(t)

        x = torch.cat((feats.tokens.to(dt), self.first(img.to(dt))), dim=1)
        mask = None
        if feats.mask is not None or extra:
            valid = feats.mask if feats.mask is not None else x.new_ones(b, txt_len, dtype=torch.bool)
            mask = torch.cat((valid, valid.new_ones(b, n), valid.new_zeros(b, extra)), dim=1)[:, None, None, :]
        if extra:
            x = torch.cat((x, x.new_zeros(b, extra, x.shape[2])), dim=1)
        if refs is not None:  # reference tokens go last: the slice below drops them
            x, tvec, rope, mask = refs.extend(self, x, tvec, rope, mask)
        for block in self.blocks:
            x = block(x, tvec, rope, mask)
        return self.last(x[:, txt_len:txt_len + n], t_emb)


def padding_for(length: int, pad_to: int | None) -> int:
    """How many tokens bring ``length`` up to a multiple of ``pad_to`` (0 without padding)."""
    if not pad_to:
        return 0
    return -length % pad_to


def build_meta(config: DiTConfig) -> SingleStreamDiT:
    """The model on the meta device (no memory), ready for ``assign_weights``."""
    with torch.device("meta"):
        return SingleStreamDiT(config)
