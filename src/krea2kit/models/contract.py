"""The latent contract between a VAE and a transformer.

A VAE plugin declares the latent space it produces; the pipeline compares it with what
the transformer consumes and refuses a mismatch before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentContract:
    """What a VAE's ``encode`` returns and its ``decode`` accepts.

    channels: latent channels handed to the transformer (16 for Qwen-Image, 32 for FLUX.2).
    factor: pixels per latent cell along each side (8 for both).
    patch: the VAE's own patchify before normalisation (1 = none; FLUX.2 normalises
        2x2-patchified 128-channel latents, then unpatchifies back to 32 x H/8 x W/8).
    normalization: how latents are normalised, e.g. "mean-std" (Qwen-Image
        ``latents_mean``/``latents_std``) or "batchnorm-patchified" (FLUX.2 running stats).
    """

    channels: int
    factor: int
    patch: int = 1
    normalization: str = "mean-std"

    def describe(self) -> str:
        text = f"{self.channels} channels at 1/{self.factor} scale, {self.normalization} normalisation"
        if self.patch > 1:
            text += f", {self.patch}x{self.patch} VAE patchify"
        return text
