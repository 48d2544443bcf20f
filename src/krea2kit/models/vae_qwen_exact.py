"""Bit-exact Qwen-Image VAE decode: diffusers' 3D arithmetic on krea2kit's folded weights.

:mod:`krea2kit.models.vae_qwen` folds the causal 3D convs into 2D convs (a single frame
only meets the last temporal kernel slice). The values are the same in exact arithmetic,
but a conv3d over a zero-padded frame stack and a conv2d sum their products in a different
order, and in bfloat16 the outputs then round differently (up to ~3 8-bit levels on random
weights). ``model.layout = "official"`` promises the reference pixels, so this path redoes
what diffusers 0.42.1 ``AutoencoderKLQwenImage.decode`` does for one frame
(``autoencoder_kl_qwenimage.py``):

* every ``QwenImageCausalConv3d`` pads ``(1, 1, 1, 1, 2, 0)`` (two zero frames in front,
  no cache on the first frame) and runs ``conv3d`` with a (3, 3, 3) kernel; 1x1 convs
  (``post_quant_conv``, shortcuts) are (1, 1, 1) conv3ds. The folded 2D kernel goes into
  the last temporal slice and the two others are zeros: they only ever meet the zero
  frames, so every product is an exact zero either way and the kernel shape, hence the
  convolution algorithm and its summation order, equals the reference's;
* RMS norm is ``F.normalize(x.float(), dim=1).to(dtype) * sqrt(C) * gamma``;
* the upsamplers and the mid attention are 2D there too (frames folded into the batch):
  nearest-exact x2 in float32, conv2d; one-head SDPA on a contiguous (1, n, 3C) tensor;
* activations and weights stay in the contiguous (NCDHW) layout, as in diffusers.

It costs 2-4.5x the fold's CPU time (about diffusers' own) and ~1.5x its activation peak
(the two zero frames are real copies; bench/bench_vae_qwen.py ``--exact``), so it is only used
where the official layout is asked for, and never for tiles: the reference never tiles.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: Causal padding of a 3x3x3 conv: (W left, W right, H top, H bottom, T front, T back).
_CAUSAL_PAD = (1, 1, 1, 1, 2, 0)


def _kernel3d(conv: Any) -> torch.Tensor:
    w = conv.weight.contiguous()
    if w.shape[-1] == 1:
        return w[:, :, None]  # 1x1 -> (1, 1, 1)
    k = w.new_zeros(w.shape[0], w.shape[1], 3, *w.shape[2:])
    k[:, :, 2] = w
    return k


def causal_conv(conv: Any, x: torch.Tensor) -> torch.Tensor:
    """One ``QwenImageCausalConv3d`` on a single frame (B, C, 1, H, W)."""
    k = _kernel3d(conv)
    if k.shape[2] == 3:
        x = F.pad(x, _CAUSAL_PAD)
    return F.conv3d(x, k, conv.bias)


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """diffusers ``QwenImageRMS_norm`` (channel-first, no bias) for 4D or 5D ``x``."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
    gamma = norm.gamma.reshape(norm.gamma.shape[0], *([1] * (x.ndim - 2)))
    return y * norm.scale * gamma


def _conv2d(conv: Any, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight.contiguous(), conv.bias, conv.stride, conv.padding)


def res_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    h = causal_conv(block.conv_shortcut, x) if block.conv_shortcut is not None else x
    x = causal_conv(block.conv1, F.silu(rms_norm(block.norm1, x)))
    x = causal_conv(block.conv2, F.silu(rms_norm(block.norm2, x)))
    return x + h


def attention(block: Any, x: torch.Tensor) -> torch.Tensor:
    identity = x
    b, c, t, h, w = x.shape
    y = rms_norm(block.norm, x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    qkv = _conv2d(block.to_qkv, y).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)
    y = F.scaled_dot_product_attention(q, k, v)
    y = _conv2d(block.proj, y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
    return y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


def upsample(up: Any, x: torch.Tensor) -> torch.Tensor:
    # time_conv never runs on the first frame (diffusers marks the cache "Rep").
    b, c, t, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    y = F.interpolate(y.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(y)
    y = _conv2d(up.resample[1], y)
    return y.view(b, t, y.shape[1], y.shape[2], y.shape[3]).permute(0, 2, 1, 3, 4)


def decode_pass(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, z, h, w) -> unclamped images (B, 3, 8h, 8w), diffusers' arithmetic."""
    dec = vae.decoder
    x = causal_conv(vae.post_quant_conv, z.contiguous()[:, :, None])
    x = causal_conv(dec.conv_in, x)
    mid = dec.mid_block
    x = res_block(mid.resnets[1], attention(mid.attentions[0], res_block(mid.resnets[0], x)))
    for blk in dec.up_blocks:
        for r in blk.resnets:
            x = res_block(r, x)
        if blk.upsamplers is not None:
            x = upsample(blk.upsamplers[0], x)
    x = causal_conv(dec.conv_out, F.silu(rms_norm(dec.norm_out, x)))
    return x[:, :, 0].contiguous()
