"""Shared helpers for the adapter tests: a tiny random Krea 2 transformer and random LoRAs."""

from __future__ import annotations

import pytest
import torch

from krea2kit.models.dit import SingleStreamDiT, image_positions, patchify
from support.presets import TINY_DIT


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm scales and modulation tables too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if (p.ndim == 1 or name.endswith("modulation.lin")) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_dit(seed: int = 0) -> SingleStreamDiT:
    return randomize(SingleStreamDiT(TINY_DIT), seed).eval().requires_grad_(False)


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def tiny_inputs(cfg, seed: int = 1, grid=(2, 3), L=5):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(2, L, cfg.txtlayers, cfg.txtdim, generator=g)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 3:] = False
    latents = torch.randn(2, cfg.channels, grid[0] * cfg.patch, grid[1] * cfg.patch, generator=g)
    t = torch.tensor([0.3, 0.8])
    return latents, txt, mask, t


def run(model: SingleStreamDiT, inputs) -> torch.Tensor:
    latents, txt, mask, t = inputs
    gh, gw = latents.shape[2] // model.config.patch, latents.shape[3] // model.config.patch
    with torch.no_grad():
        return model(patchify(latents, model.config.patch), t, txt, mask, (gh, gw))


def diffusers_run(ref, cfg, inputs) -> torch.Tensor:
    latents, txt, mask, t = inputs
    gh, gw = latents.shape[2] // cfg.patch, latents.shape[3] // cfg.patch
    pos = torch.cat([torch.zeros(txt.shape[1], 3), image_positions((gh, gw)).float()])
    with torch.no_grad():
        return ref(patchify(latents, cfg.patch), txt, t, pos, mask).sample


def random_lora_deltas(model: torch.nn.Module, rank: int = 4, seed: int = 0, scale: float = 1.0,
                       std: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{native module: (down (r,in), up (out,r))} for every Linear of the model."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in linears(model).items():
        o, i = mod.weight.shape
        r = min(rank, o, i)
        out[name] = (torch.randn(r, i, generator=g) * std * 4, torch.randn(o, r, generator=g) * std)
    return out


@pytest.fixture
def dit():
    return tiny_dit(0)


@pytest.fixture
def inputs(dit):
    return tiny_inputs(dit.config)
