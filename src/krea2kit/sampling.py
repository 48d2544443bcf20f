"""Flow-matching numerics around the transformer: sizes, schedule, noise, samplers, pixels.

Everything here follows the official Krea 2 sampler (``krea-ai/krea-2`` @ db3984f,
``sampling.py``) bit for bit where the official code defines the behaviour:

* sizes are padded *up* to multiples of 16 (VAE factor 8 x patch 2; the constants below are
  Krea 2's, and the pipeline passes the loaded parts' own ``contracts.size_multiple``);
* ``mu`` is linear in the image-token count between (256, 0.5) and (6400, 1.15), not clamped;
* the schedule is ``t = linspace(1, 0, steps + 1)`` time-shifted by ``e^mu``, in float32 on CPU;
* noise for image ``i`` is ``randn`` from a fresh generator seeded ``seed + i``, drawn on the
  run's device in the run's dtype (a ``[variation]`` slerps it toward a second seed's noise,
  :func:`slerp_noise`, AUTOMATIC1111's variation seed);
* the Euler update is ``x = x + (t_next - t) * v`` with Python-float step sizes;
* pixels are ``clamp(-1, 1) * 0.5 + 0.5``, times 255, truncated to uint8 (no rounding).

Convention (official): ``x_t = t * noise + (1 - t) * x0`` and the model predicts the velocity
``v = noise - x0``, so ``x0 = x_t - t * v`` and ``dx/dt = v``.

A sampler is a plain function ``sampler(denoise, x, sigmas, *, generator=None, callback=None,
**options) -> x`` (:class:`krea2kit.contracts.Sampler`) where ``denoise(x, sigma: float) -> v``
and ``callback(step_index, total_steps, sigma, x)`` runs after every step. ``SAMPLERS`` maps
names to the built-in functions; their summaries and options schemas are the one table
``krea2kit.sampler_options.BUILTIN_SAMPLERS`` (torch-free, so a recipe checks ``[sampler]``
before any weights load), which ``SAMPLER_OPTIONS`` reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# --- sizes ---------------------------------------------------------------------------------

# Pixels per latent cell of the Qwen-Image VAE (official ``ae.compression``).
VAE_FACTOR = 8
# Latent channels of the Qwen-Image VAE (official ``ae.channels``).
LATENT_CHANNELS = 16
# Transformer patch size (official config ``patch=2``).
PATCH = 2
# Official ``align = ae.compression * patch``: one image token covers 16 x 16 pixels.
SIZE_MULTIPLE = VAE_FACTOR * PATCH

# --- schedule constants (official ``sample``/``timesteps`` defaults) -----------------------

# ``minres=256, maxres=1280`` give the token counts of the two interpolation endpoints:
# x1 = (256 // 16)**2 = 256 and x2 = (1280 // 16)**2 = 6400.
MU_MIN_RESOLUTION = 256
MU_MAX_RESOLUTION = 1280
MU_MIN_TOKENS = (MU_MIN_RESOLUTION // SIZE_MULTIPLE) ** 2
MU_MAX_TOKENS = (MU_MAX_RESOLUTION // SIZE_MULTIPLE) ** 2
# ``y1=0.5, y2=1.15``: mu at those endpoints.
MU_AT_MIN_TOKENS = 0.5
MU_AT_MAX_TOKENS = 1.15
# The TDM-distilled Turbo checkpoint was trained at a fixed shift (official docstring of
# ``timesteps``; diffusers ``Krea2Pipeline`` uses 1.15 when ``is_distilled``).
DISTILLED_MU = 1.15


def aligned_size(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int, bool]:
    """Pad ``width`` and ``height`` up to multiples of ``multiple`` (official ``roundup``).

    Returns ``(aligned_width, aligned_height, padded)``; ``padded`` says whether either side
    grew, so the caller can crop the decoded image back with :func:`to_pixels` ``size=``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    w = ((width + multiple - 1) // multiple) * multiple
    h = ((height + multiple - 1) // multiple) * multiple
    return w, h, (w, h) != (width, height)


def image_tokens(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Transformer image tokens for a picture of ``width`` x ``height`` pixels, one token per
    ``multiple`` x ``multiple`` pixels (VAE factor x transformer patch; Krea 2: 8 x 2 = 16).

    The size is aligned first (as the official sampler does before it counts
    ``x.shape[1]``), so 1000 x 1000 counts as 1008 x 1008 = 63 * 63 tokens.
    """
    w, h, _ = aligned_size(width, height, multiple)
    return (w // multiple) * (h // multiple)


def resolution_mu(image_tokens: int) -> float:
    """Resolution-aware time shift (official ``timesteps`` with ``mu=None``).

    Linear in the image-token count through (256, 0.5) and (6400, 1.15), NOT clamped:
    1024^2 (4096 tokens) gives 0.90625 and 2048^2 (16384 tokens) extrapolates to 2.20625.
    The arithmetic order matches the official code, so the float is bit-identical.
    """
    slope = (MU_AT_MAX_TOKENS - MU_AT_MIN_TOKENS) / (MU_MAX_TOKENS - MU_MIN_TOKENS)
    return slope * image_tokens + (MU_AT_MIN_TOKENS - slope * MU_MIN_TOKENS)


def flow_sigmas(steps: int, mu: float) -> torch.Tensor:
    """The official shifted schedule: ``steps + 1`` float32 values on CPU from 1 down to 0.

    ``t = linspace(1, 0, steps + 1)`` then ``t' = e^mu / (e^mu + (1/t - 1))``. At t = 0,
    ``1/t`` is +inf so t' is exactly 0, as in the official code (no special case needed).
    The tensor expression is the official one op for op (``scalar / tensor`` is
    ``reciprocal * scalar`` in torch), so ``flow_sigmas(...).tolist()`` equals the official
    ``timesteps(...)`` list exactly.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float32, device="cpu")
    shift = math.exp(mu)
    return shift / (shift + (1.0 / t - 1.0))


# --- noise ---------------------------------------------------------------------------------


def initial_noise(
    seed: int,
    height: int,
    width: int,
    *,
    channels: int = LATENT_CHANNELS,
    factor: int = VAE_FACTOR,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Starting latent for one image, shape ``(1, channels, height/factor, width/factor)``.

    Drawn exactly as the official sampler draws image ``i`` (with ``seed`` = base seed + i):
    a fresh ``torch.Generator`` on ``device`` seeded with ``seed``, and ``torch.randn`` on
    ``device`` directly in ``dtype``. The official run uses the model's device and dtype
    (``cuda``, ``bfloat16``); pass the same to get the same noise. ``height``/``width`` are
    the aligned pixel size (see :func:`aligned_size`).
    """
    if height % factor or width % factor:
        raise ValueError(
            f"noise size {width}x{height} is not a multiple of {factor}; align it first "
            "with aligned_size()"
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(
        1, channels, height // factor, width // factor,
        device=device, dtype=dtype, generator=generator,
    )


def slerp_noise(strength: float, base: torch.Tensor, variation: torch.Tensor) -> torch.Tensor:
    """``base`` moved toward ``variation`` by ``strength`` along a great circle: AUTOMATIC1111's
    variation seed (``modules/processing.py``: ``slerp(subseed_strength, noise, subnoise)``).

    As there, the angle is measured per channel and per column: each ``(channel, x)`` column
    of a ``(1, C, H, W)`` latent is one vector over its ``H`` rows (A1111 normalises a
    ``(C, H, W)`` noise along dim 1). Near-parallel columns (mean cosine above 0.9995) fall back
    to a plain linear mix (A1111's fallback swaps the two weights; the intended one is used).
    Strength 0 returns ``base`` and strength 1 ``variation`` unchanged, bit for bit, so those
    ends give exactly the plain image and the variation seed's image. The mix is computed in
    float32 and returned in ``base``'s dtype.
    """
    if strength <= 0.0:
        return base
    if strength >= 1.0:
        return variation.to(base.dtype)
    low, high = base.float(), variation.float()
    rows = 2  # the H axis of (1, C, H, W)
    low_unit = low / torch.linalg.vector_norm(low, dim=rows, keepdim=True)
    high_unit = high / torch.linalg.vector_norm(high, dim=rows, keepdim=True)
    cosine = (low_unit * high_unit).sum(rows, keepdim=True)
    if cosine.mean() > 0.9995:
        mixed = low * (1.0 - strength) + high * strength
    else:
        omega = torch.acos(cosine.clamp(-1.0, 1.0))
        sin_omega = torch.sin(omega)
        weight_low = torch.sin((1.0 - strength) * omega) / sin_omega
        mixed = weight_low * low + (torch.sin(strength * omega) / sin_omega) * high
    return mixed.to(base.dtype)


def varied_noise(
    seed: int,
    variation_seed: int | None,
    strength: float,
    height: int,
    width: int,
    **kwargs,
) -> torch.Tensor:
    """The starting latent of one image with a variation seed: :func:`initial_noise` of
    ``seed`` (drawn exactly as without one) slerped toward that of ``variation_seed`` by
    ``strength`` (:func:`slerp_noise`). Both are drawn from their own fresh generators, so the
    result depends on this image alone, never on its batch or its neighbours."""
    base = initial_noise(seed, height, width, **kwargs)
    if variation_seed is None or strength <= 0.0:
        return base
    return slerp_noise(strength, base, initial_noise(variation_seed, height, width, **kwargs))


# --- samplers ------------------------------------------------------------------------------

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int, float, torch.Tensor], None]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


# Options schemas live in a torch-free module so recipes validate without torch.
from krea2kit.contracts import LoadContext, Sampler  # noqa: E402  (the sampler protocol lives there)
from krea2kit.sampler_options import BUILTIN_SAMPLERS, AncestralOptions, EulerOptions, HeunOptions  # noqa: E402


def _as_floats(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    # Python floats, like the official ``ts.tolist()``: step sizes are then computed in
    # double from float32 values, exactly as the official loop does.
    values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("sigmas needs at least two values (one step)")
    return values


@torch.no_grad()
def euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], *,
          generator: Generators = None, callback: StepCallback | None = None,
          **options: object) -> torch.Tensor:
    """First-order Euler integration of the flow ODE ``dx/dt = v``.

    Source: the official Krea 2 loop (``krea-ai/krea-2`` ``sampling.py::sample``),
    ``img = img + (t_prev - t_curr) * v``; same operations, so bit-identical in any dtype.
    One model call per step. ``generator`` is accepted for a uniform signature and unused.
    """
    EulerOptions(**options)
    ts = _as_floats(sigmas)
    total = len(ts) - 1
    for i in range(total):
        t, t_next = ts[i], ts[i + 1]
        v = denoise(x, t)
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, total, t_next, x)
    return x


@torch.no_grad()
def heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], *,
         generator: Generators = None, callback: StepCallback | None = None,
         **options: object) -> torch.Tensor:
    """Second-order Heun (explicit trapezoid) integration of the flow ODE.

    Source: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
    Models", Algorithm 1 (deterministic sampler, no churn), as in k-diffusion
    ``sample_heun``; with a flow model the ODE slope is the velocity itself, so no
    ``to_d`` conversion is needed. The step into t = 0 is a plain Euler step, as in the
    algorithm. Two model calls per step except the last (``2 * steps - 1`` in all).
    """
    HeunOptions(**options)
    ts = _as_floats(sigmas)
    total = len(ts) - 1
    for i in range(total):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = denoise(x, t)
        if t_next == 0:
            x = x + dt * v
        else:
            x_euler = x + dt * v
            v_next = denoise(x_euler, t_next)
            x = x + (0.5 * dt) * (v + v_next)
        if callback is not None:
            callback(i, total, t_next, x)
    return x


def _fresh_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn in float32 on the generator's device.

    Drawing on the generator's device makes a CPU generator give the same noise whatever
    device ``x`` lives on. A sequence of generators gives each batch row its own stream
    (one per image, so a row never depends on the batch size).
    """
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=torch.float32).to(x.dtype)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, device=generator.device,
                            dtype=torch.float32)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        noise = torch.cat([
            torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32)
            for g in generator
        ])
    return noise.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                    *, generator: Generators = None, callback: StepCallback | None = None,
                    **options: object) -> torch.Tensor:
    """Stochastic Euler ancestral sampling for rectified flow.

    Source: ComfyUI ``comfy/k_diffusion/sampling.py::sample_euler_ancestral_RF`` (the
    sampler ComfyUI runs for ``euler_ancestral`` on flow models). Each step goes down to
    ``sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)`` with a deterministic
    Euler step, rescales the signal by ``(1 - sigma_next) / (1 - sigma_down)`` and adds
    fresh noise ``s_noise * sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 /
    (1 - sigma_down)^2)`` so the marginal at ``sigma_next`` is right again. The Euler part is
    written in velocity form ``x + (sigma_down - sigma) * v``, so ``eta = 0`` is bit-identical
    to :func:`euler`; the step into t = 0 adds no noise. Options: :class:`AncestralOptions`.
    ``generator`` (one, or one per batch row) makes the fresh noise reproducible.
    """
    opts = AncestralOptions(**options)
    ts = _as_floats(sigmas)
    total = len(ts) - 1
    for i in range(total):
        t, t_next = ts[i], ts[i + 1]
        v = denoise(x, t)
        t_down = t_next * (1.0 + (t_next / t - 1.0) * opts.eta)
        x = x + (t_down - t) * v
        if opts.eta > 0 and t_next > 0:
            alpha_next, alpha_down = 1.0 - t_next, 1.0 - t_down
            renoise = math.sqrt(max(t_next**2 - (t_down * alpha_next / alpha_down) ** 2, 0.0))
            noise = _fresh_noise(x, generator)
            x = (alpha_next / alpha_down) * x + (opts.s_noise * renoise) * noise
        if callback is not None:
            callback(i, total, t_next, x)
    return x


SAMPLERS: dict[str, Sampler] = {
    "euler": euler,
    "heun": heun,
    "euler_ancestral": euler_ancestral,
}

SAMPLER_OPTIONS: dict[str, type] = {row.name: row.options for row in BUILTIN_SAMPLERS}


def load(options: object, context: LoadContext) -> Sampler:
    """The registry's ``load(options, context)`` of every built-in sampler: the function named
    ``context.name`` (its options arrive again as keywords on each call)."""
    return SAMPLERS[context.name]


# --- image-to-image and inpainting --------------------------------------------------------
#
# Same flow convention as above, x_t = t * noise + (1 - t) * x0, with x0 the encoded init
# picture. ``strength`` s skips the first round((1 - s) * steps) steps of the schedule (the
# convention of SDEdit-style img2img in diffusers and ComfyUI's denoise), so s = 1 is
# text-to-image and s = 0 runs no step at all. The samplers are unchanged: they get the
# remaining sigmas; inpainting blends through their step callback.


def skipped_steps(steps: int, strength: float) -> int:
    """Steps of the schedule an ``[init]`` run skips at ``strength`` (0 = all, 1 = none)."""
    return min(steps, max(0, round((1.0 - strength) * steps)))


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x0`` noised to ``sigma`` along the flow: ``sigma * noise + (1 - sigma) * x0``;
    exactly ``noise`` at sigma 1 (so strength 1 is text-to-image bit for bit)."""
    if sigma >= 1.0:
        return noise
    return sigma * noise + (1.0 - sigma) * x0


def pixels_to_tensor(image: Image.Image, width: int, height: int, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An RGB (or L) picture of at most ``width`` x ``height`` as ``(1, C, height, width)``
    in [-1, 1] (L: [0, 1]); a smaller picture is padded right and bottom by repeating its
    edge (the padded run crops that margin off again, :func:`to_pixels` ``size=``)."""
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / 255.0
    t = torch.from_numpy(array.copy())
    t = t.unsqueeze(0).unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).unsqueeze(0)
    if image.mode != "L":
        t = t * 2.0 - 1.0
    pad_w, pad_h = width - t.shape[3], height - t.shape[2]
    if pad_w or pad_h:
        t = torch.nn.functional.pad(t, (0, pad_w, 0, pad_h), mode="replicate")
    return t.to(device=device, dtype=dtype)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask ``(1, 1, H, W)`` in [0, 1] averaged onto the latent grid ``(h, w)``
    (each latent cell gets the mean of the pixels it covers)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask, latent_size).clamp(0.0, 1.0)


def inpaint_blend(x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                  sigma: float) -> torch.Tensor:
    """``mask * x + (1 - mask) * x0 noised to sigma``: the sampler's latent where the mask is
    1 (repaint), the init picture at the same noise level where it is 0 (keep)."""
    return mask * x + (1.0 - mask) * noised(x0, noise, sigma)


# --- pixels --------------------------------------------------------------------------------


def to_pixels(decoded: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """Decoded images ``(B, 3, H, W)`` in [-1, 1] to RGB PIL images.

    Same arithmetic as the official sampler, in the decoded tensor's own dtype and device
    (bfloat16 there): ``clamp(-1, 1) * 0.5 + 0.5``, then ``* 255.0``, moved to CPU and
    converted with ``.byte()``, which TRUNCATES (0.999 -> 254, not 255). ``size=(width,
    height)`` crops the top-left ``width x height`` region when the run was padded up to a
    multiple of 16 (the official code returns the padded image).
    """
    from PIL import Image

    if decoded.ndim != 4 or decoded.shape[1] != 3:
        raise ValueError(
            f"expected decoded images of shape (B, 3, H, W), got {tuple(decoded.shape)}")
    if size is not None:
        width, height = size
        if width > decoded.shape[3] or height > decoded.shape[2]:
            raise ValueError(
                f"cannot crop {decoded.shape[3]}x{decoded.shape[2]} images to {width}x{height}"
            )
        decoded = decoded[:, :, :height, :width]
    img = decoded.clamp(-1, 1) * 0.5 + 0.5
    img = (img * 255.0).permute(0, 2, 3, 1).cpu().byte().numpy()
    return [Image.fromarray(img[i]) for i in range(img.shape[0])]
