"""The built-in autoencoders as pipeline parts: one interface over both models."""

from __future__ import annotations

from typing import Any


class VAEPart:
    """``encode(images) -> latents``, ``decode(latents) -> images in [-1, 1]``, ``contract``.

    Tiling switches on by itself above ``tile_threshold`` pixels (the model's default
    unless a recipe sets ``model.vae_tile_threshold``).
    """

    def __init__(self, module: Any, identity: str, threshold_attr: str) -> None:
        self.module = module
        self.identity = identity
        self.contract = module.contract
        self._threshold_attr = threshold_attr

    def set_tile_threshold(self, pixels: int | None) -> None:
        if pixels is not None:
            setattr(self.module, self._threshold_attr, int(pixels))

    def encode(self, images):
        return self.module.encode(images, tile="auto")

    def decode(self, latents):
        return self.module.decode(latents, tile="auto")

    @property
    def device(self):
        return self.module.device

    @property
    def dtype(self):
        return self.module.dtype


def _identity(location: str) -> str:
    from krea2kit.models.weights import open_checkpoint

    return open_checkpoint(location).identity()


def load_qwen(location: str, *, config: str = "", dtype: str = "float32", device: str = "cpu", options=None,
              settings=None) -> VAEPart:
    import torch

    from krea2kit.models.vae_qwen import load_qwen_vae

    module = load_qwen_vae(location, config=config or None, dtype=getattr(torch, dtype), device=device).eval()
    return VAEPart(module, _identity(location), "tile_threshold")


def load_flux2(location: str, *, config: str = "", dtype: str = "float32", device: str = "cpu", options=None,
               settings=None) -> VAEPart:
    import torch

    from krea2kit.models.vae_flux2 import load_flux2_vae

    module = load_flux2_vae(location, config=config or None, dtype=getattr(torch, dtype), device=device).eval()
    return VAEPart(module, _identity(location), "auto_tile_threshold_pixels")
