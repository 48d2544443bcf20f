"""The Krea 2 denoiser: latents and a flow time in, velocity out, with guidance.

Wraps a :class:`~krea2kit.models.dit.SingleStreamDiT` for one run (one prompt batch):
the text features and the RoPE table are computed once, and classifier-free guidance
runs the conditional and unconditional passes as one batch of 2B.

Guidance follows the official sampler (krea-ai/krea-2 ``sampling.py``): with Krea's ``g``,
``v = cond + g * (cond - uncond)``, enabled iff ``g > 0``. The usual CFG scale ``s``
(``uncond + s * (cond - uncond)``, ComfyUI's "cfg") is the same thing with ``s = g + 1``;
``convention="standard"`` converts ``s`` to ``g = s - 1`` so both give identical images
(``s = 1`` is Turbo's "no guidance").
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from krea2kit.models.dit import Rope, SingleStreamDiT, TextFeatures, patchify, unpatchify

Convention = Literal["krea", "standard"]
Layout = Literal["official", "compact"]

# The official forward pads [text | image] to a multiple of 256 tokens (krea-ai/krea-2 mmdit.py).
OFFICIAL_PAD_TO = 256


def krea_guidance(guidance: float, convention: Convention = "krea") -> float:
    """The guidance as Krea's ``g`` (``v = cond + g (cond - uncond)``)."""
    if convention == "krea":
        return float(guidance)
    if convention == "standard":
        return float(guidance) - 1.0
    raise ValueError(f"unknown guidance convention {convention!r}; use 'krea' or 'standard'")


class Krea2Denoiser:
    """Velocity model for one run: ``denoiser(x, sigma) -> v``.

    dit: the transformer (its weights' dtype is the compute dtype, like the official sampler,
        which runs everything in the model dtype).
    txt, txt_mask: conditional text, (B or 1, L, taps, txtdim) tapped hidden states and a
        (B or 1, L) bool mask of valid tokens (``None``: all valid).
    uncond_txt, uncond_mask: the negative prompt's text (the official default is ``""``);
        required when guidance is on.
    guidance: ``g`` for ``convention="krea"`` (official; CFG iff g > 0), or the standard CFG
        scale ``s`` for ``convention="standard"`` (converted to ``g = s - 1``).
    latent_hw: (H/f, W/f) latent size (f: the VAE's factor), to build the RoPE table now (else
        on the first call).
    batch_cfg: run cond and uncond as one batch (fast, default) or as two passes (less
        activation memory; same result up to fp32 rounding).
    layout: "official" (default, as ``model.layout`` and the Krea 2 presets) keeps the padded
        text positions and pads the sequence to a multiple of 256 as the reference forward
        does, so bf16 images are bit-identical to it; "compact" drops all padding (fewer
        tokens; equal to 1e-6 in fp32, a few bf16 LSB).
    """

    def __init__(
        self,
        dit: SingleStreamDiT,
        txt: Tensor,
        txt_mask: Tensor | None = None,
        *,
        uncond_txt: Tensor | None = None,
        uncond_mask: Tensor | None = None,
        guidance: float = 0.0,
        convention: Convention = "krea",
        latent_hw: tuple[int, int] | None = None,
        batch_cfg: bool = True,
        layout: Layout = "official",
    ) -> None:
        self.dit = dit
        self.guidance = krea_guidance(guidance, convention)
        self.batch_cfg = batch_cfg
        if layout not in ("official", "compact"):
            raise ValueError(f"unknown sequence layout {layout!r}; use 'official' or 'compact'")
        # "official": keep padded text tokens and pad the sequence to 256 like the reference
        # (bit-identical images in bf16); "compact": drop both (same result up to rounding).
        self.pad_to = OFFICIAL_PAD_TO if layout == "official" else None
        drop = layout == "compact"
        self.patch = dit.config.patch
        with torch.no_grad():
            self.cond = dit.encode_text(txt.to(dit.device), None if txt_mask is None else txt_mask.to(dit.device),
                                        drop_padding=drop)
            self.uncond: TextFeatures | None = None
            if self.cfg:
                if uncond_txt is None:
                    raise ValueError("guidance is on: pass uncond_txt (the negative prompt's text; officially \"\")")
                self.uncond = dit.encode_text(
                    uncond_txt.to(dit.device), None if uncond_mask is None else uncond_mask.to(dit.device),
                    drop_padding=drop)
        self._ropes: dict[tuple[int, int, int], Rope] = {}
        self._batched: dict[int, TextFeatures] = {}
        if latent_hw is not None:
            gh, gw = self._grid(latent_hw)
            for feats in self._text_layouts():
                self._rope(feats.length, gh, gw)

    @property
    def cfg(self) -> bool:
        """Whether guidance runs (official rule: g > 0)."""
        return self.guidance > 0

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.compute_dtype

    # -- cached per-run pieces -------------------------------------------------------
    def _grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = latent_hw
        if h % self.patch or w % self.patch:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {self.patch} "
                             f"(image sizes must be multiples of the VAE factor x {self.patch})")
        return h // self.patch, w // self.patch

    def _rope(self, txt_len: int, gh: int, gw: int) -> Rope:
        key = (txt_len, gh, gw)
        if key not in self._ropes:
            self._ropes[key] = self.dit.rope_table(txt_len, gh, gw, self.dit.device, pad_to=self.pad_to)
        return self._ropes[key]

    def _text_layouts(self) -> list[TextFeatures]:
        if not self.cfg:
            return [self.cond]
        if self.batch_cfg:
            return [TextFeatures.cat([self.cond, self.uncond])]  # type: ignore[list-item]
        return [self.cond, self.uncond]  # type: ignore[list-item]

    def _both(self, batch: int) -> TextFeatures:
        """Cond and uncond features as one batch of 2B (built once per batch size)."""
        if batch not in self._batched:
            self._batched[batch] = TextFeatures.cat([self.cond.expand(batch), self.uncond.expand(batch)])  # type: ignore[union-attr]
        return self._batched[batch]

    # -- the call ---------------------------------------------------------------------
    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Velocity (B, C, H/f, W/f) for latents ``x`` (B, C, H/f, W/f) at flow time ``sigma``.

        Like the official sampler, ``sigma`` is handed to the model in the compute dtype
        (so bf16 models see bf16-rounded times) and the guidance is combined in that dtype;
        the result is returned in ``x``'s dtype.
        """
        b = x.shape[0]
        gh, gw = self._grid((x.shape[2], x.shape[3]))
        dt = self.dtype
        tokens = patchify(x.to(device=self.dit.device, dtype=dt), self.patch)
        if torch.is_tensor(sigma):
            t = sigma.to(device=tokens.device, dtype=dt).reshape(-1).expand(b)
        else:
            t = torch.full((b,), float(sigma), device=tokens.device, dtype=dt)
        with torch.no_grad():
            if not self.cfg:
                v = self._run(tokens, t, self.cond.expand(b), gh, gw)
            elif self.batch_cfg:
                both = self._run(torch.cat((tokens, tokens)), torch.cat((t, t)), self._both(b), gh, gw)
                cond, uncond = both[:b], both[b:]
                v = cond + self.guidance * (cond - uncond)
            else:
                cond = self._run(tokens, t, self.cond.expand(b), gh, gw)
                uncond = self._run(tokens, t, self.uncond.expand(b), gh, gw)  # type: ignore[union-attr]
                v = cond + self.guidance * (cond - uncond)
        return unpatchify(v, (gh, gw), self.patch).to(x.dtype)

    def _run(self, tokens: Tensor, t: Tensor, feats: TextFeatures, gh: int, gw: int) -> Tensor:
        return self.dit(tokens, t, rope=self._rope(feats.length, gh, gw), txt_features=feats, pad_to=self.pad_to)
