"""Tests for krea2kit.sampling: sizes, schedule, noise, samplers and pixel conversion.

Golden values come from the official Krea 2 code (``krea-ai/krea-2`` @ db3984f,
``sampling.py``), run once with torch 2.13 CPU:

    from sampling import timesteps
    timesteps(0, 8, 256, 6400, mu=1.15)     # Turbo, 8 steps
    timesteps(4096, 28, 256, 6400)          # Raw at 1024^2, official CLI default 28 steps
    timesteps(1024, 4, 256, 6400)           # 512^2, 4 steps

and printed with ``repr``. The official loops (Euler update, noise draw, pixel conversion)
are restated below as explicit reference code so each comparison is bit-exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from krea2kit.sampling import (
    DISTILLED_MU,
    SAMPLER_OPTIONS,
    SAMPLERS,
    AncestralOptions,
    aligned_size,
    euler,
    euler_ancestral,
    flow_sigmas,
    heun,
    image_tokens,
    initial_noise,
    resolution_mu,
    to_pixels,
)

OFFICIAL_TURBO_8 = [1.0, 0.956723690032959, 0.9045307636260986, 0.8403487801551819,
                    0.7595109343528748, 0.6545668244361877, 0.5128440856933594,
                    0.31090107560157776, 0.0]
OFFICIAL_RAW_1024_28 = [
    1.0, 0.9852563738822937, 0.9698570966720581, 0.9537577033042908, 0.9369091391563416,
    0.9192578196525574, 0.9007453322410583, 0.8813065886497498, 0.8608706593513489,
    0.8393586874008179, 0.8166833519935608, 0.7927476167678833, 0.7674435377120972,
    0.7406502366065979, 0.712232232093811, 0.6820370554924011, 0.6498928070068359,
    0.6156042814254761, 0.5789497494697571, 0.5396752953529358, 0.49748989939689636,
    0.4520571827888489, 0.40298739075660706, 0.34982550144195557, 0.29203739762306213,
    0.22899165749549866, 0.15993666648864746, 0.08397020399570465, 0.0]
OFFICIAL_512_4 = [1.0, 0.842886209487915, 0.6413549780845642, 0.3734692335128784, 0.0]


# --- sizes and schedule --------------------------------------------------------------------


def test_aligned_size_pads_up_to_16():
    assert aligned_size(1024, 1024) == (1024, 1024, False)
    assert aligned_size(1000, 1030) == (1008, 1040, True)
    assert aligned_size(1, 17) == (16, 32, True)
    assert aligned_size(100, 64, multiple=64) == (128, 64, True)
    with pytest.raises(ValueError):
        aligned_size(0, 16)


def test_image_tokens_counts_the_aligned_grid():
    assert image_tokens(1024, 1024) == 4096
    assert image_tokens(256, 256) == 256
    assert image_tokens(1280, 1280) == 6400
    assert image_tokens(1000, 1000) == 63 * 63
    assert image_tokens(1024, 512) == 64 * 32
    # another VAE factor x patch: one token per 32 pixels, the size padded up to it first
    assert image_tokens(1024, 1000, multiple=32) == 32 * 32


def test_resolution_mu_matches_official_floats_and_is_not_clamped():
    # Official: slope * seq_len + (y1 - slope * x1) with x1=256, x2=6400, y1=0.5, y2=1.15.
    assert resolution_mu(256) == 0.5
    assert resolution_mu(6400) == 1.15
    assert resolution_mu(4096) == 0.90625          # Raw at 1024^2
    assert resolution_mu(16384) == 2.20625         # 2048^2 extrapolates beyond 1.15
    assert resolution_mu(64) < 0.5                 # and below 0.5 under 256 tokens


def test_flow_sigmas_equal_official_output_exactly():
    for steps, mu, expected in [(8, DISTILLED_MU, OFFICIAL_TURBO_8),
                                (28, resolution_mu(4096), OFFICIAL_RAW_1024_28),
                                (4, resolution_mu(1024), OFFICIAL_512_4)]:
        sigmas = flow_sigmas(steps, mu)
        assert sigmas.dtype == torch.float32 and sigmas.device.type == "cpu"
        assert sigmas.tolist() == expected  # bit-exact, not approximately


def test_flow_sigmas_turbo_formula_values():
    sigmas = flow_sigmas(8, 1.15)
    published = [1.0, .9567, .9045, .8403, .7595, .6546, .5128, .3109, 0.0]
    assert torch.allclose(sigmas, torch.tensor(published), atol=1e-4, rtol=0)
    assert sigmas[-1].item() == 0.0 and sigmas[0].item() == 1.0
    # The same formula in double precision, t = 0 mapped to 0.
    for t, s in zip(np.linspace(1, 0, 9), sigmas.tolist()):
        ref = 0.0 if t == 0 else math.exp(1.15) / (math.exp(1.15) + (1 / t - 1))
        assert abs(ref - s) < 1e-6
    with pytest.raises(ValueError):
        flow_sigmas(0, 1.0)


def test_flow_sigmas_match_diffusers_dynamic_shifting():
    # diffusers' FlowMatchEulerDiscreteScheduler, configured as Krea2Pipeline expects, with
    # the pipeline's sigmas = linspace(1, 1/N, N). It builds the grid in float64 numpy and
    # shifts in float32 numpy, so it agrees to 1 ulp, not bit for bit (measured max abs
    # difference 1.2e-7 over these cases).
    diffusers = pytest.importorskip("diffusers")
    for steps, tokens in [(8, None), (28, 4096), (52, 4096), (4, 256), (30, 16384)]:
        mu = DISTILLED_MU if tokens is None else resolution_mu(tokens)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=6400)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = flow_sigmas(steps, mu)
        assert scheduler.sigmas.shape == ours.shape
        assert (scheduler.sigmas - ours).abs().max().item() <= 1e-6


# --- noise ---------------------------------------------------------------------------------


def _official_noise(seed, n, height, width, dtype):
    # The official draw, restated: one fresh generator per image on the run's device.
    return torch.cat([
        torch.randn(1, 16, height // 8, width // 8, device="cpu", dtype=dtype,
                    generator=torch.Generator(device="cpu").manual_seed(seed + i))
        for i in range(n)
    ], dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_noise_matches_official_draw(dtype):
    noise = initial_noise(7, 48, 32, dtype=dtype)
    assert noise.shape == (1, 16, 6, 4) and noise.dtype == dtype
    assert torch.equal(noise, _official_noise(7, 1, 48, 32, dtype))
    # a run of 3 images draws image i with seed + i, as the official per-prompt loop does
    run = torch.cat([initial_noise(7 + i, 48, 32, dtype=dtype) for i in range(3)])
    assert torch.equal(run, _official_noise(7, 3, 48, 32, dtype))


def test_noise_depends_only_on_its_seed():
    assert torch.equal(initial_noise(3, 32, 32), initial_noise(3, 32, 32))
    assert not torch.equal(initial_noise(3, 32, 32), initial_noise(4, 32, 32))


def test_initial_noise_refuses_unaligned_size():
    with pytest.raises(ValueError, match="aligned_size"):
        initial_noise(0, 30, 32)


# --- samplers ------------------------------------------------------------------------------


def _toy_velocity(x, t):
    # Nonlinear in x and t so any reordering of the update shows up in the bits.
    return torch.tanh(x * 1.3) * t + torch.sin(x) - 0.25


def test_euler_is_bit_exact_with_official_loop_in_bf16_and_fp32():
    for dtype in (torch.bfloat16, torch.float32):
        x0 = initial_noise(0, 64, 64, dtype=dtype)
        # Official loop (sampling.py::sample), restated with the official schedule list.
        img = x0
        for tcurr, tprev in zip(OFFICIAL_TURBO_8[:-1], OFFICIAL_TURBO_8[1:]):
            v = _toy_velocity(img, tcurr)
            img = img + (tprev - tcurr) * v
        ours = euler(_toy_velocity, x0, flow_sigmas(8, 1.15))
        assert ours.dtype == dtype
        assert torch.equal(ours, img)


def _gaussian_flow(mean, std):
    """Exact flow velocity for data N(mean, std^2) and noise N(0, 1).

    x_t = t*noise + (1-t)*x0 has marginal N((1-t)*mean, t^2 + (1-t)^2 std^2); the ODE moves
    x_t = (1-t)*mean + sigma_t * x_1 with sigma_t = sqrt(t^2 + (1-t)^2 std^2), so from x_1
    the exact end point is mean + std * x_1.
    """
    def velocity(x, t):
        var = t * t + (1 - t) ** 2 * std * std
        return -mean + (t - (1 - t) * std * std) / var * (x - (1 - t) * mean)
    return velocity


def test_heun_is_second_order_and_beats_euler():
    velocity = _gaussian_flow(1.0, 2.0)
    x1 = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = 1.0 + 2.0 * x1

    def err(sampler, steps, mu):
        return (sampler(velocity, x1, flow_sigmas(steps, mu)) - exact).abs().max().item()

    for mu in (0.0, DISTILLED_MU):
        # Measured (mu=0 / mu=1.15): Euler 0.56 / 0.52 and Heun 0.017 / 0.065 at 16 steps.
        assert err(heun, 16, mu) < err(euler, 16, mu) / 5
        assert err(heun, 16, mu) < err(euler, 32, mu) / 2   # also at equal model calls
        # Halving the step: Euler error halves (order 1), Heun error quarters (order 2).
        assert 1.8 < err(euler, 16, mu) / err(euler, 32, mu) < 2.2
        assert 3.5 < err(heun, 16, mu) / err(heun, 32, mu) < 4.5


def test_heun_model_calls_and_last_step_euler():
    calls = []

    def velocity(x, t):
        calls.append(t)
        return _toy_velocity(x, t)

    sigmas = flow_sigmas(5, 1.0)
    x = initial_noise(1, 16, 16)
    heun(velocity, x, sigmas)
    assert len(calls) == 2 * 5 - 1
    assert 0.0 not in calls  # the step into t = 0 is Euler: the model never sees t = 0
    # One step straight to 0 is exactly one Euler step.
    one = torch.tensor([0.8, 0.0])
    assert torch.equal(heun(_toy_velocity, x, one), euler(_toy_velocity, x, one))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_called_once_per_step_with_arguments(name):
    sigmas = flow_sigmas(6, 1.15)
    seen = []
    out = SAMPLERS[name](_toy_velocity, initial_noise(2, 16, 16), sigmas,
                         generator=torch.Generator().manual_seed(0),
                         callback=lambda i, n, s, x: seen.append((i, n, s, x.clone())))
    assert [(i, n) for i, n, _, _ in seen] == [(i, 6) for i in range(6)]
    assert [s for _, _, s, _ in seen] == sigmas.tolist()[1:]
    assert all(isinstance(s, float) for _, _, s, _ in seen)
    assert torch.equal(seen[-1][3], out)


def test_ancestral_reproducible_and_seed_dependent():
    sigmas = flow_sigmas(8, 1.15)
    x = initial_noise(0, 32, 32)

    def run(seed, **opts):
        return euler_ancestral(_toy_velocity, x, sigmas,
                               generator=torch.Generator().manual_seed(seed), **opts)

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    assert not torch.allclose(run(5, s_noise=0.5), run(5))
    assert not torch.allclose(run(5), euler(_toy_velocity, x, sigmas))


def test_ancestral_eta_zero_is_euler_bit_exact():
    sigmas = flow_sigmas(8, 1.15)
    for dtype in (torch.bfloat16, torch.float32):
        x = initial_noise(0, 32, 32, dtype=dtype)
        a = euler_ancestral(_toy_velocity, x, sigmas, eta=0.0,
                            generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, euler(_toy_velocity, x, sigmas))


def test_ancestral_per_row_generators_do_not_depend_on_batch():
    sigmas = flow_sigmas(6, 1.15)
    x = torch.cat([initial_noise(0, 32, 32), initial_noise(1, 32, 32)])

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = euler_ancestral(_toy_velocity, x, sigmas, generator=gens(5, 6))
    alone = euler_ancestral(_toy_velocity, x[1:], sigmas, generator=gens(6))
    assert torch.equal(both[1:], alone)
    with pytest.raises(ValueError):
        euler_ancestral(_toy_velocity, x, sigmas, generator=gens(5))


def test_ancestral_samples_the_right_distribution():
    # With the exact velocity of Gaussian data the stochastic sampler must still land on
    # N(mean, std^2) up to its first-order step bias (measured with 40k samples: std 0.428,
    # 0.475, 0.499 at 16, 64, 256 uniform steps; mean 1.501 at 256).
    mean, std = 1.5, 0.5
    x = torch.randn(40_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = euler_ancestral(_gaussian_flow(mean, std), x, flow_sigmas(256, 0.0),
                          generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mean) < 0.01
    assert abs(out.std().item() - std) < 0.01
    # and it is not just the ODE map of the same start (which is deterministic per sample)
    assert (out - (mean + std * x)).abs().mean().item() > 0.1


def test_sampler_options_schemas():
    assert set(SAMPLER_OPTIONS) == set(SAMPLERS) == {"euler", "heun", "euler_ancestral"}
    assert AncestralOptions().eta == 1.0 and AncestralOptions().s_noise == 1.0
    assert SAMPLER_OPTIONS["euler_ancestral"].model_validate({"eta": 0.5}).eta == 0.5
    for name, model in SAMPLER_OPTIONS.items():
        with pytest.raises(ValidationError):
            model.model_validate({"nonsense": 1})
    with pytest.raises(ValidationError):
        AncestralOptions(eta=1.5)
    with pytest.raises(ValidationError):
        AncestralOptions(s_noise=-1)
    sigmas = flow_sigmas(2, 1.0)
    x = initial_noise(0, 16, 16)
    for name, sampler in SAMPLERS.items():
        with pytest.raises(ValidationError):
            sampler(_toy_velocity, x, sigmas, nonsense=1)


# --- pixels --------------------------------------------------------------------------------


def _official_pixels(img):
    # Official conversion, restated: clamp, affine, *255, HWC on CPU, .byte() truncation.
    img = img.clamp(-1, 1) * 0.5 + 0.5
    return (img * 255.0).permute(0, 2, 3, 1).cpu().byte().numpy()


def test_to_pixels_truncates_like_official_fp32():
    decoded = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    decoded[0, 0, 0, :4] = torch.tensor([0.999, -0.999, 2.0, -3.0])
    images = to_pixels(decoded)
    got = np.stack([np.asarray(im) for im in images])
    # Explicit float32 computation with truncation (floor of a non-negative value).
    x = np.clip(decoded.numpy(), -1, 1) * np.float32(0.5) + np.float32(0.5)
    expected = np.floor(x * np.float32(255.0)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(got, expected)
    assert got[0, 0, :4, 0].tolist() == [254, 0, 255, 0]  # 254.87 truncates to 254
    rounded = np.round(x * np.float32(255.0)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert (rounded != got).any()  # rounding would give different pixels


def test_to_pixels_bf16_matches_official_arithmetic():
    decoded = (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.7
               ).to(torch.bfloat16)
    got = np.asarray(to_pixels(decoded)[0])
    assert np.array_equal(got, _official_pixels(decoded)[0])
    # The bf16 arithmetic matters: the float32 path differs on some pixels.
    assert not np.array_equal(got, _official_pixels(decoded.float())[0])


def test_to_pixels_channel_order_mode_and_crop():
    decoded = -torch.ones(1, 3, 32, 48)
    decoded[:, 0] = 1.0                       # channel 0 is red
    decoded[:, 2, :20, :30] = 1.0             # blue in the top-left block
    (image,) = to_pixels(decoded)
    assert image.mode == "RGB" and image.size == (48, 32)
    assert image.getpixel((40, 25)) == (255, 0, 0)
    (crop,) = to_pixels(decoded, size=(30, 20))
    assert crop.size == (30, 20)
    assert crop.getpixel((29, 19)) == (255, 0, 255)
    assert np.array_equal(np.asarray(crop), np.asarray(image)[:20, :30])
    with pytest.raises(ValueError):
        to_pixels(decoded, size=(64, 20))
    with pytest.raises(ValueError):
        to_pixels(torch.zeros(1, 4, 8, 8))
