"""The training objective uses the sampler's conventions: the same velocity, the same time
shift, the official x_t; plus the learning-rate schedule and the data order."""

from __future__ import annotations

import math

import pytest
import torch

from krea2kit.models.dit import SingleStreamDiT
from krea2kit.sampling import image_tokens, resolution_mu
from krea2kit.train.objective import (caption_dropout, flow_matching_loss, noised, pad_text, sample_timesteps,
                                      shift_mu, velocity)
from support.presets import TINY_DIT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: OpenMP spinning only slows them


def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = SingleStreamDiT(TINY_DIT)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return m.eval().requires_grad_(False)


def test_timesteps_are_the_samplers_shift_of_a_logit_normal():
    mu = shift_mu("resolution", 1024, 1024)
    assert mu == resolution_mu(image_tokens(1024, 1024)) == pytest.approx(0.90625)
    t = sample_timesteps(torch.Generator().manual_seed(3), 4096, mu)
    u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(3)))
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))  # krea2kit.sampling.flow_sigmas' shift
    assert torch.allclose(t, shifted, atol=1e-6)
    assert 0 < float(t.min()) and float(t.max()) < 1
    # a larger image shifts the times toward noise, as the sampler does
    t_small = sample_timesteps(torch.Generator().manual_seed(3), 4096, shift_mu("resolution", 256, 256))
    assert float(t.mean()) > float(t_small.mean())
    assert shift_mu(1.15, 64, 64) == 1.15 and shift_mu("uniform", 64, 64) is None
    tu = sample_timesteps(torch.Generator().manual_seed(0), 4096, None)
    assert abs(float(tu.mean()) - 0.5) < 0.02


def test_noised_follows_the_official_convention():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(noised(x0, noise, torch.tensor([1.0, 0.0]))[0], noise[0])
    assert torch.equal(noised(x0, noise, torch.tensor([1.0, 0.0]))[1], x0[1])


def test_training_velocity_is_the_samplers_velocity():
    """The trained forward equals what Krea2Denoiser (the sampler's denoiser) computes."""
    from krea2kit.denoiser import Krea2Denoiser

    dit = _tiny(0)
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(1, 5, TINY_DIT.txtlayers, TINY_DIT.txtdim, generator=g)
    mask = torch.tensor([[True, True, True, False, False]])
    x = torch.randn(1, TINY_DIT.channels, 4, 6, generator=g)
    den = Krea2Denoiser(dit, txt, mask, layout="compact")
    expect = den(x, 0.4)
    got = velocity(dit, x, torch.tensor([0.4]), txt, mask)
    assert (got - expect).abs().max().item() <= 1e-6


def test_loss_is_mse_to_noise_minus_x0_and_zero_for_a_perfect_model():
    dit = _tiny(0)
    g = torch.Generator().manual_seed(2)
    txt = torch.randn(2, 4, TINY_DIT.txtlayers, TINY_DIT.txtdim, generator=g)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.9])
    loss = flow_matching_loss(dit, x0, txt, None, t=t, noise=noise)
    v = velocity(dit, noised(x0, noise, t), t, txt, None)
    assert float(loss) == pytest.approx(float(((v - (noise - x0)) ** 2).mean()), rel=1e-6)

    class Oracle(torch.nn.Module):  # predicts the true velocity: loss 0
        config = dit.config
        compute_dtype = torch.float32

        def forward(self, img, t, txt=None, txt_mask=None, grid_hw=None):
            from krea2kit.models.dit import patchify

            return patchify(noise - x0, 2)

    assert float(flow_matching_loss(Oracle(), x0, txt, None, t=t, noise=noise)) == 0.0


def test_caption_dropout_rates_and_a_stream_independent_of_the_rate():
    for rate in (0.0, 0.3, 1.0):
        g = torch.Generator().manual_seed(5)
        drops = caption_dropout(g, 10000, rate)
        after = torch.rand(1, generator=g)
        assert abs(sum(drops) / 10000 - rate) < 0.02
        g2 = torch.Generator().manual_seed(5)
        torch.rand(10000, generator=g2)
        assert torch.equal(after, torch.rand(1, generator=g2))  # the same draws whatever the rate


def test_pad_text_masks_the_padding():
    a = (torch.randn(3, 2, 4), None)
    b = (torch.randn(5, 2, 4), torch.ones(5, dtype=torch.bool))
    txt, mask = pad_text([a, b])
    assert txt.shape == (2, 5, 2, 4) and mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert torch.equal(txt[0, :3], a[0]) and not txt[0, 3:].any()


def test_lr_schedules():
    from krea2kit.train.loop import lr_at
    from krea2kit.train.schema import TrainRecipe

    base = {"dataset": {"path": "d"}, "steps": 100, "optimizer": {"lr": 1e-3}}
    r = TrainRecipe.model_validate({**base, "schedule": {"kind": "constant", "warmup": 10}})
    assert [lr_at(r, s) for s in (0, 4, 9, 10, 99)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    c = TrainRecipe.model_validate({**base, "schedule": {"kind": "cosine", "warmup": 0, "min_lr": 0.1}})
    assert lr_at(c, 0) == pytest.approx(1e-3)
    assert lr_at(c, 50) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(c, 100) == pytest.approx(1e-4)
    vals = [lr_at(c, s) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_data_order_is_a_pure_function_of_seed_and_step():
    from krea2kit.train.loop import DataOrder

    buckets = [(64, 64)] * 5 + [(48, 80)] * 3
    order = DataOrder(buckets, batch_size=2, seed=7)
    assert order.per_epoch == 3 + 2
    for e in range(3):
        batches = [order.batch(e * order.per_epoch + i) for i in range(order.per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(8))  # each sample once per epoch
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)  # a batch never mixes buckets
    again = DataOrder(buckets, batch_size=2, seed=7)
    assert [again.batch(s) for s in range(12)] == [order.batch(s) for s in range(12)]
    assert [order.batch(s) for s in range(5)] != [order.batch(s) for s in range(5, 10)]
    assert order.position(11) == (2, 1)
