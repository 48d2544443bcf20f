"""Models with every weight random (gammas and biases included), for tests."""

from __future__ import annotations

import math

import torch

from krea2kit.models.vae_qwen import QwenImageVAE, QwenVAEConfig


def random_qwen_vae(config: QwenVAEConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> QwenImageVAE:
    """A Qwen-Image VAE of ``config`` (e.g. ``support.presets.QWEN_VAES["tiny"]``), seeded."""
    g = torch.Generator().manual_seed(seed)
    vae = QwenImageVAE(config)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return vae.to(dtype).eval().requires_grad_(False).set_channels_last(True)
