"""The built-in Krea 2 transformer as a pipeline part."""

from __future__ import annotations

from typing import Any


class DiTPart:
    """A loaded :class:`~krea2kit.models.dit.SingleStreamDiT` and how to make a denoiser."""

    def __init__(self, module: Any, identity: str) -> None:
        self.module = module
        self.identity = identity

    def make_denoiser(self, cond, uncond, *, guidance: float, height: int, width: int, layout: str = "official"):
        """``denoise(x, sigma)`` for one image: text features and RoPE computed once, cond
        and uncond batched when guidance is on (Krea convention; the plan converts)."""
        from krea2kit.denoiser import Krea2Denoiser

        txt, mask = cond
        kwargs = {}
        if uncond is not None:
            kwargs = {"uncond_txt": uncond[0], "uncond_mask": uncond[1]}
        return Krea2Denoiser(self.module, txt, mask, guidance=guidance, convention="krea",
                             latent_hw=(height // 8, width // 8), layout=layout, **kwargs)


def load(location: str, *, config: str = "", dtype: str = "float32", device: str = "cpu", options=None,
         settings=None) -> DiTPart:
    import torch

    from krea2kit.models.dit import PRESETS
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.weights import open_checkpoint

    cfg = PRESETS[config] if config else None
    # The official sampler casts the whole model to its dtype, norm scales included
    # (krea-ai/krea-2 inference.py); keeping them fp32 would not reproduce its images.
    module = load_dit(location, config=cfg, dtype=getattr(torch, dtype), device=device, keep_norms_fp32=False)
    module.eval()
    return DiTPart(module, open_checkpoint(location).identity())
