"""The training objective: flow matching in the official Krea 2 convention.

Convention (``krea2kit.sampling``, krea-ai/krea-2 ``sampling.py``): ``x_t = t · noise + (1 − t) · x0``
for a flow time ``t`` in [0, 1] (1 = noise), and the transformer predicts the velocity
``v = noise − x0``; the loss is the mean squared error to that target (the nano Raw was
trained with exactly this, ``nano-train/nanodev/train.py``).

Timesteps: ``t = sigmoid(N(0, 1) + mu)``. A standard logit-normal ``u = sigmoid(N(0, 1))``
pushed through the sampler's time shift ``e^mu / (e^mu + 1/u − 1)`` is exactly this, so
training spends its effort where the sampler puts its steps. ``mu`` is Krea's
resolution-aware shift (:func:`krea2kit.sampling.resolution_mu`: 0.5 at 256 image tokens,
1.15 at 6400, linear, unclamped), computed per bucket, or a fixed number (``shift = 1.15``
is Turbo's). ``shift = "uniform"`` draws ``t ~ U(0, 1)`` instead.

Caption dropout replaces a caption's embedding by the empty prompt's (the official negative
prompt is ``""``), so the adapter keeps classifier-free guidance working on Raw.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from krea2kit.models.dit import patchify, unpatchify
from krea2kit.sampling import SIZE_MULTIPLE, image_tokens, resolution_mu


def shift_mu(shift: float | str, width: int, height: int, multiple: int = SIZE_MULTIPLE) -> float | None:
    """The logit-normal location for images of ``width`` x ``height`` pixels: Krea's
    resolution-aware mu (``"resolution"``), a fixed number, or ``None`` for ``"uniform"``."""
    if shift == "uniform":
        return None
    if shift == "resolution":
        return resolution_mu(image_tokens(width, height, multiple))
    return float(shift)


def sample_timesteps(generator: torch.Generator, batch: int, mu: float | None) -> Tensor:
    """(batch,) flow times in (0, 1) on the CPU, from ``generator`` (see the module docstring)."""
    if mu is None:
        return torch.rand(batch, generator=generator)
    return torch.sigmoid(torch.randn(batch, generator=generator) + mu)


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = t · noise + (1 − t) · x0`` with ``t`` (B,) broadcast over the latent."""
    tb = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return tb * noise + (1.0 - tb) * x0


def velocity(dit, x: Tensor, t: Tensor, txt: Tensor, mask: Tensor | None) -> Tensor:
    """The transformer's velocity (B, C, h, w) for latents ``x`` at times ``t`` with autograd,
    through the same forward the sampler's denoiser uses (compact text layout)."""
    p = dit.config.patch
    grid = (x.shape[2] // p, x.shape[3] // p)
    dt = dit.compute_dtype
    out = dit(patchify(x, p).to(dt), t.to(x.device, dt), txt=txt.to(x.device),
              txt_mask=None if mask is None else mask.to(x.device), grid_hw=grid)
    return unpatchify(out, grid, p)


def flow_matching_loss(dit, x0: Tensor, txt: Tensor, mask: Tensor | None, *, t: Tensor, noise: Tensor) -> Tensor:
    """Mean squared error between the predicted and the true velocity ``noise − x0`` (fp32)."""
    xt = noised(x0, noise, t)
    v = velocity(dit, xt, t, txt, mask)
    return F.mse_loss(v.float(), (noise - x0).float())


def caption_dropout(generator: torch.Generator, batch: int, rate: float) -> list[bool]:
    """Which rows of a batch take the empty prompt: one uniform draw per row, always made
    (even at rate 0) so the random stream does not depend on the rate."""
    draws = torch.rand(batch, generator=generator)
    return [bool(d < rate) for d in draws]


def pad_text(items: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
    """Stack per-sample text ``(L_i, taps, D)`` with masks ``(L_i,)`` into ``(B, L, taps, D)``
    and ``(B, L)``, padding with masked zero tokens (masked keys change nothing)."""
    length = max(h.shape[0] for h, _ in items)
    hs, ms = [], []
    for h, m in items:
        m = torch.ones(h.shape[0], dtype=torch.bool) if m is None else m.to(torch.bool)
        extra = length - h.shape[0]
        if extra:
            h = torch.cat((h, h.new_zeros(extra, *h.shape[1:])))
            m = torch.cat((m, m.new_zeros(extra)))
        hs.append(h)
        ms.append(m)
    return torch.stack(hs), torch.stack(ms)
