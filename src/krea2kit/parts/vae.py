"""The built-in autoencoders as pipeline parts (:class:`krea2kit.contracts.VAEPart`):
one interface over both models."""

from __future__ import annotations

from typing import Any

from krea2kit.contracts import LoadContext
from krea2kit.parts import weights_fingerprint


class VAEPart:
    """``encode(images) -> latents``, ``decode(latents) -> images in [-1, 1]``, ``contract``.

    Tiling switches on by itself above the model's tile threshold (its default unless the
    recipe's ``model.vae_tile_threshold`` arrives through the load context).
    """

    def __init__(self, module: Any, identity: str) -> None:
        self.module = module
        self.identity = identity
        self.contract = module.contract

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


def _load(loader: Any, context: LoadContext) -> VAEPart:
    """Either model through ``loader(location, config=, dtype=, device=)``; both read the
    recipe's tile threshold from ``tile_threshold``."""
    import torch

    module = loader(context.location, config=context.config or None, dtype=getattr(torch, context.dtype),
                    device=context.device).eval()
    if context.vae_tile_threshold is not None:
        module.tile_threshold = int(context.vae_tile_threshold)
    return VAEPart(module, weights_fingerprint(context.location))


def load_qwen(options: None, context: LoadContext) -> VAEPart:
    from krea2kit.models.vae_qwen import load_qwen_vae

    part = _load(load_qwen_vae, context)
    # The official layout promises the reference pixels: decode with diffusers' 3D
    # arithmetic (bit-identical in bf16, slower); "compact" keeps the fast 2D fold.
    part.module.exact_decode = context.layout == "official"
    return part


def load_flux2(options: None, context: LoadContext) -> VAEPart:
    from krea2kit.models.vae_flux2 import load_flux2_vae

    return _load(load_flux2_vae, context)
