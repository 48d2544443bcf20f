"""Reference tokens in the transformer: layout, modulation, RoPE, attention mask.

:class:`References` is what :meth:`krea2kit.models.dit.SingleStreamDiT.forward` takes as
``refs=``; its :meth:`References.extend` appends the active references' tokens after the
sequence the model built (``[text | image | padding]``) and returns the per-token time
vectors, the RoPE table and the float attention mask to use. The last layer slices the image
tokens out as always, so the reference outputs are dropped.

The in-context layout follows the community Krea 2 edit/reference convention as ai-toolkit
implements it (ostris/ai-toolkit ``extensions_built_in/diffusion_models/krea2/src/pipeline.py``
``pack_ref_latents`` and ``src/mmdit.py`` ``SingleStreamDiT.forward``): clean reference
latents patchified like the image, appended after the image tokens, the i-th reference at
RoPE ``(i + 1, row, col)`` with its own grid from 0, modulated with t = 0 (ComfyUI Kontext's
"index_timestep_zero") while text and image keep the real t; the prediction covers the image
tokens only. The attention mode is that layout with the reference's queries restricted to
its own keys (ai-toolkit's ``isolate_refs``): its hidden states then depend on nothing else,
so the image attends to exactly the keys and values a separate pass of the reference through
the same blocks would give (training-free K/V injection as InvokeAI's reference PRs
#9508/#9512 describe).

Strength: ``log(strength)`` is added to every logit toward a reference key; a reference at
strength 0 is left out of the sequence, and with none left the model runs its plain path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from krea2kit.denoiser import Krea2Denoiser
from krea2kit.models.dit import Rope, image_positions, rope_from_positions


@dataclass
class ReferenceTokens:
    """One reference: patchified clean latents ``tokens`` (1, gh*gw, C*p*p) on ``grid``."""

    tokens: Tensor
    grid: tuple[int, int]
    frame: int
    mode: str  # "in-context" | "attention"
    strength: Callable[[int, int], float]
    name: str = ""

    @property
    def count(self) -> int:
        return self.tokens.shape[1]


def positions(grid: tuple[int, int], frame: int, device=None) -> Tensor:
    """(gh*gw, 3) RoPE positions ``(frame, row, col)`` of a reference's tokens, row-major."""
    pos = image_positions(grid, device)
    pos[:, 0] = float(frame)
    return pos


@dataclass
class References:
    """The references of one image, with the sampler step they are evaluated at."""

    items: list[ReferenceTokens]
    step: tuple[int, int] = (0, 1)
    _ropes: dict = field(default_factory=dict, repr=False)

    def set_step(self, step: int, total: int) -> None:
        self.step = (step, total)

    def active(self) -> list[tuple[ReferenceTokens, float]]:
        """The references with a positive strength at the current step, with it."""
        out = []
        for item in self.items:
            s = float(item.strength(*self.step))
            if s > 0.0:
                out.append((item, s))
        return out

    # -- the hook SingleStreamDiT.forward calls ----------------------------------------------
    def extend(self, dit: Any, x: Tensor, tvec: Tensor, rope: Rope, mask: Tensor | None):
        active = self.active()
        if not active:
            return x, tvec, rope, mask
        b, length, _ = x.shape
        dt, device = x.dtype, x.device
        ref_x = torch.cat([dit.first(item.tokens.to(device=device, dtype=dt)) for item, _ in active], dim=1)
        count = ref_x.shape[1]
        total = length + count
        x = torch.cat((x, ref_x.expand(b, -1, -1)), dim=1)
        # clean latents: modulated at t = 0, the rest at the real t (per-token time vectors)
        _, tvec0 = dit.time_vectors(torch.zeros(1, device=device, dtype=dt))
        tvec = torch.cat((tvec.expand(b, length, -1), tvec0.to(tvec.dtype).expand(b, count, -1)), dim=1)
        rope = self._rope(dit, rope, active)
        return x, tvec, rope, self._mask(mask, active, b, length, total, dt, device)

    def _rope(self, dit: Any, rope: Rope, active) -> Rope:
        key = (id(rope.cos), tuple((item.grid, item.frame) for item, _ in active))
        hit = self._ropes.get(key)
        if hit is None or hit[0] is not rope:
            pos = torch.cat([positions(item.grid, item.frame, rope.cos.device) for item, _ in active])
            extra = rope_from_positions(pos, dit.config.axes, dit.config.theta)
            hit = (rope, Rope(torch.cat((rope.cos, extra.cos)), torch.cat((rope.sin, extra.sin)), rope.txt_len))
            self._ropes[key] = hit
        return hit[1]

    @staticmethod
    def _mask(mask: Tensor | None, active, b: int, length: int, total: int, dt, device) -> Tensor:
        """Additive float mask: ``-inf`` on masked keys, ``log(strength)`` on each reference's
        keys; (b, 1, 1, total) when every reference is in-context, else (b, 1, total, total)
        with each attention-mode reference's queries seeing its own keys only."""
        bias = torch.zeros(b, total, dtype=dt, device=device)
        if mask is not None:
            valid = mask.reshape(mask.shape[0], -1)[:, :length].expand(b, -1)
            bias[:, :length].masked_fill_(~valid, float("-inf"))
        spans = []
        start = length
        for item, s in active:
            bias[:, start:start + item.count] = math.log(s)
            spans.append((start, start + item.count, item.mode))
            start += item.count
        if all(mode == "in-context" for _, _, mode in spans):
            return bias[:, None, None, :]
        full = bias[:, None, None, :].expand(b, 1, total, total).clone()
        for lo, hi, mode in spans:
            if mode == "attention":
                full[:, :, lo:hi, :] = float("-inf")
                full[:, :, lo:hi, lo:hi] = 0.0  # a constant over its own keys: strength cancels there
        return full


class ReferenceDenoiser(Krea2Denoiser):
    """A :class:`~krea2kit.denoiser.Krea2Denoiser` whose model calls carry the references
    (cond and uncond alike); without an active reference it is the plain denoiser."""

    references: References

    @classmethod
    def wrap(cls, base: Krea2Denoiser, references: References) -> "ReferenceDenoiser":
        # Same state as the denoiser the part built (text features, RoPE cache, guidance),
        # so the part's own construction stays the one place that decides them.
        obj = cls.__new__(cls)
        obj.__dict__.update(base.__dict__)
        obj.references = references
        return obj

    def _run(self, tokens: Tensor, t: Tensor, feats, gh: int, gw: int) -> Tensor:
        if not self.references.active():
            return super()._run(tokens, t, feats, gh, gw)
        return self.dit(tokens, t, rope=self._rope(feats.length, gh, gw), txt_features=feats, pad_to=self.pad_to,
                        refs=self.references)


def prepare(pipeline: Any, plan: Any, job: Any, dit: Any, vae: Any, denoise: Any, size: tuple[int, int],
            device: str, dtype: Any, *, start_step: int) -> tuple[Any, References]:
    """Encode the plan's reference pictures for ``job`` (framed to its size like ``[init]``)
    and return the denoiser that uses them, with the :class:`References` to step."""
    from krea2kit import sampling
    from krea2kit.errors import PluginError
    from krea2kit.models.dit import SingleStreamDiT, patchify
    from krea2kit.recipe.init_image import framed, open_checked
    from krea2kit.recipe.references import reference_name

    if not isinstance(denoise, Krea2Denoiser) or not isinstance(getattr(dit, "module", None), SingleStreamDiT):
        raise PluginError(f"the transformer part of {plan.model.name!r} does not take reference images "
                          "(only the built-in Krea 2 transformer does)", key="references",
                          hint="remove [[references]] or use a Krea 2 model preset")
    width, height = size
    patch = int(dit.patch_size)
    fns = strength_fns(plan)
    items = []
    for i, entry in enumerate(plan.recipe.references):
        picture = framed(open_checked(entry.image, f"references.{i}.image"), job.width, job.height)
        source = sampling.pixels_to_tensor(picture, width, height, device=device, dtype=dtype)
        with torch.inference_mode():
            latents = vae.encode(source)
        pipeline.require_finite(plan, latents, "vae", f"the encoded reference {entry.name!r} of image {job.index}")
        grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
        items.append(ReferenceTokens(patchify(latents, patch), grid, entry.frame if entry.frame is not None else i + 1,
                                     entry.mode, fns[i], reference_name(entry)))
    references = References(items)
    references.set_step(start_step, plan.steps)
    return ReferenceDenoiser.wrap(denoise, references), references


def strength_fns(plan: Any) -> list[Any]:
    """``fn(step, total)`` per ``[[references]]`` entry, in order. A reference a slider drives
    gets what its sliders give times its own ``strength`` (as a LoRA bound to a slider does);
    the others their ``strength`` on every step. Negative results count as 0."""
    from krea2kit.lora.apply import StepSchedule
    from krea2kit.lora.sliders import combine_strengths
    from krea2kit.recipe.references import SLIDER_PREFIX, reference_name

    sliders = [(part, entry.value) for entry, _kind, part in plan.slider_parts
               if any(t.startswith(SLIDER_PREFIX) for t in part.loras)]
    driven = combine_strengths({}, sliders) if sliders else {}
    out = []
    for entry in plan.recipe.references:
        fn = driven.get(SLIDER_PREFIX + reference_name(entry))
        out.append(_Scaled(fn, entry.strength) if fn is not None else StepSchedule(entry.strength))
    return out


class _Scaled:
    def __init__(self, fn, factor: float) -> None:
        self.fn, self.factor = fn, factor

    def __call__(self, step: int, total: int) -> float:
        return self.factor * self.fn(step, total)
