"""Fast checks of the nano training code (nano-train/nanodev/train.py): a handful of steps each.

One module fixture runs the whole CLI (``all``: vae -> text encoder -> raw -> turbo) for 2 steps
per stage at tiny batch sizes; the other tests reuse its exported weights.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nanodev import train as T

TINY = ["--steps", "2", "--batch", "2", "--pool", "8", "--teacher-substeps", "2", "--ckpt-every", "1",
        "--log-every", "1", "--eval-every", "1", "--eval-images", "4", "--stats-images", "8", "--threads", "1"]


# One thread (tests/conftest.py): 15 VAE steps took 73 s with 2 threads under load, under
# 1 s with one. main() sets the count too; the session gets its own back afterwards.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano-train")
    assert T.main(["all", "--out", str(out), *TINY]) == 0
    return out


def _fixed_steps(params, loss_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _assert_learns(losses: list[float], factor: float) -> None:
    assert all(math.isfinite(v) for v in losses), losses
    assert min(losses[-3:]) < factor * losses[0], losses


def test_vae_training_forward_equals_inference_forward():
    from krea2kit.models.vae_qwen import QwenImageVAE
    from nanodev import configs

    vae = T.new_nano_vae(3)
    ref = QwenImageVAE(configs.vae_config())
    ref.load_state_dict(vae.state_dict())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():  # randomise every weight (gammas and biases too)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        ref.load_state_dict(vae.state_dict())
        x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
        mean = T.vae_posterior(vae, x)[0]
        enc_err = (ref.encode_raw(x, tile=None) - mean).abs().max().item()
        dec_err = (ref.decode_raw(mean, tile=None) - vae.decoder(vae.post_quant_conv(mean)).clamp(-1, 1)).abs().max()
    # measured: 0 and ~6e-6 (same ops, in-place vs out-of-place rounding order)
    assert enc_err <= 1e-5 and float(dec_err) <= 1e-5


def test_vae_loss_decreases_on_fixed_batch():
    vae = T.new_nano_vae(0)
    x = T.images_to_tensor([T.world_item(0, "train", i)[0] for i in range(4)])

    def loss():
        return T.vae_loss(vae, x, torch.Generator().manual_seed(1), 1e-5)[0]

    _assert_learns(_fixed_steps(vae.parameters(), loss, 15, 1e-3), 0.8)


def test_raw_flow_matching_loss_decreases_on_fixed_batch(run_dir):
    te = T.load_nano_text_encoder(run_dir / "weights" / "text_encoder")
    dit = T.new_nano_dit(5)
    x0 = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    hidden, mask = T.encode_text(te, ["a red circle on the left", "two blue squares", "", "a small green cross"])

    def loss():
        return T.flow_matching_loss(dit, x0, hidden, mask, torch.Generator().manual_seed(3), T.nano_mu())[0]

    _assert_learns(_fixed_steps(dit.parameters(), loss, 15, 2e-3), 0.7)


def test_turbo_regression_loss_decreases_on_fixed_batch(run_dir):
    cfg = T.stage_config("turbo", batch=2, pool=8, teacher_substeps=2)
    tr = T.TurboTrainer(cfg, run_dir / "turbo-fixed", 0, weights=run_dir / "weights", log=lambda m: None)
    hidden, mask = T.encode_text(tr.te, ["a red circle", "a blue square at the top"])
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    x, v_target = tr.targets(noise, hidden, mask, 3)
    t = torch.full((2,), tr.sigmas[3])
    # The student starts as a copy of the teacher, and after the fixture's two Raw steps the
    # teacher's guidance changes little: move the student away so there is something to learn.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))

    def loss():
        return torch.nn.functional.mse_loss(T.dit_velocity(tr.model, x, t, hidden, mask), v_target)

    _assert_learns(_fixed_steps([p for p in tr.model.parameters() if p.requires_grad], loss, 12, 2e-3), 0.7)


def test_exports_load_through_the_normal_loaders(run_dir):
    from krea2kit.denoiser import Krea2Denoiser
    from krea2kit.models.dit_loader import load_dit
    from krea2kit.models.vae_qwen import load_qwen_vae
    from nanodev import configs
    from krea2kit.sampling import euler, flow_sigmas

    w = run_dir / "weights"
    vae = load_qwen_vae(w / "vae")
    cfg = json.loads((w / "vae" / "config.json").read_text())
    assert vae.config.latents_mean == tuple(cfg["latents_mean"]) and vae.config.latents_std == tuple(cfg["latents_std"])
    assert vae.config.latents_mean != configs.vae_config().latents_mean  # measured statistics, not the defaults
    assert all(s > 0 for s in vae.config.latents_std)
    from krea2kit.conditioning import load_text_encoder

    te = load_text_encoder(w / "text_encoder", taps=configs.NANO_TAPS)
    hidden, mask = te.encode(["a red circle on the left"])
    assert hidden.shape[2:] == (12, 64)
    for name in ("raw", "turbo"):
        dit = load_dit(w / name)
        assert dit.config == configs.dit_config()
        den = Krea2Denoiser(dit, hidden, mask, guidance=0.0, layout="compact")
        x = euler(den, torch.randn(1, 16, 8, 8), flow_sigmas(2, 1.15))
        img = vae.decode(x)
        assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    # The Raw export is the EMA of the trained weights: it differs from the untrained init.
    init = T.new_nano_dit(T.DEFAULT_SEED + 1).state_dict()
    raw = load_dit(w / "raw").state_dict()
    assert any(not torch.equal(init[k], raw[k]) for k in init)


def test_raw_stage_trains_the_text_tower_and_exports_it(run_dir, tmp_path):
    from safetensors.torch import load_file

    init = T.export_text_encoder(tmp_path / "init", T.DEFAULT_SEED)  # what the raw stage starts from
    trained = run_dir / "weights" / "text_encoder"
    a, b = load_file(str(init / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(k.startswith(T.TEXT_PREFIX) for k in b)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the EMA of trained weights, not the init
    assert (init / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    # the checkpoint holds both halves under their own prefixes
    state = load_file(str(T.list_checkpoints(run_dir / "raw")[-1] / "ema.safetensors"))
    dit, tower = T.split_dit_with_text(state)
    assert tower is not None and sorted(tower) == sorted(b)
    assert set(dit) == set(T.new_nano_dit(0).state_dict())


def test_evaluate_turns_a_raw_checkpoint_into_loadable_parts(run_dir, tmp_path):
    from krea2kit.conditioning import load_text_encoder
    from krea2kit.models.dit_loader import load_dit
    from nanodev import configs
    from nanodev.evaluate import export_checkpoint

    parts = export_checkpoint(T.list_checkpoints(run_dir / "raw")[-1], run_dir / "weights", tmp_path / "x")
    dit = load_dit(parts["dit"], dtype=torch.float32)
    shipped = load_dit(run_dir / "weights" / "raw", dtype=torch.float32)
    for k, v in shipped.state_dict().items():  # the export is the same EMA, rounded to fp16
        assert torch.allclose(dit.state_dict()[k].float(), v, rtol=1e-3, atol=1e-4), k
    te = load_text_encoder(parts["text_encoder"], taps=configs.NANO_TAPS)
    assert te.encode(["a red circle"])[0].shape[2:] == (12, 64)


def test_cli_wrote_checkpoints_and_logs(run_dir):
    for stage in T.STAGES:
        ckpts = T.list_checkpoints(run_dir / stage)
        assert [c.name for c in ckpts] == ["ckpt-0000001", "ckpt-0000002"]
        state = json.loads((ckpts[-1] / "state.json").read_text())
        assert state["step"] == 2 and state["extra"]["stage"] == stage
        logs = [json.loads(line) for line in (run_dir / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logs] == [1, 2] and all(math.isfinite(r["loss"]) for r in logs)
    assert "psnr_heldout" in logs[0] or "psnr_heldout" in json.loads(
        (run_dir / "vae" / "log.jsonl").read_text().splitlines()[-1])
    # never pickles: every checkpoint file is safetensors or JSON
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert f.suffix in (".safetensors", ".json", ".jsonl"), f


def test_cli_refuses_to_overwrite_without_resume(run_dir):
    with pytest.raises(SystemExit):
        T.main(["vae", "--out", str(run_dir), *TINY])


@pytest.mark.parametrize("stage", ["vae", "raw", "raw128"])
def test_resume_gives_identical_continuation(run_dir, tmp_path, stage):
    cfg = T.stage_config(stage, steps=3, batch=2, pool=8, ckpt_every=1, log_every=1, eval_every=0)

    def trainer(folder):
        if stage == "vae":
            return T.VAETrainer(cfg, folder, 7, log=lambda m: None)
        if stage == "raw128":
            return T.Raw128Trainer(cfg, folder, 7, weights=run_dir / "weights",
                                   init=T.list_checkpoints(run_dir / "raw")[-1], log=lambda m: None)
        return T.RawTrainer(cfg, folder, 7, weights=run_dir / "weights", log=lambda m: None)

    straight = trainer(tmp_path / "a")
    straight.run()
    first = trainer(tmp_path / "b")
    first.run(steps=2)
    resumed = trainer(tmp_path / "b")  # a fresh process would build exactly this
    resumed.run(resume=True)
    assert resumed.step == straight.step == 3
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if stage != "vae":
        assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    # the resumed run's log reads as one uninterrupted run
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["loss"] for r in logged] == [r["loss"] for r in straight.history]
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_step_randomness_depends_only_on_seed_stage_step():
    g1, r1 = T.step_rngs(1, "raw", 5)
    g2, r2 = T.step_rngs(1, "raw", 5)
    g3, _ = T.step_rngs(1, "raw", 6)
    a, b, c = torch.randn(4, generator=g1), torch.randn(4, generator=g2), torch.randn(4, generator=g3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert r1.integers(0, 1000) == r2.integers(0, 1000)


def test_t_sampling_is_the_shifted_logit_normal():
    mu = T.nano_mu()
    t = T.sample_t(torch.Generator().manual_seed(0), 20000, mu)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - mu) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert np.isclose(mu, 0.5 - 0.65 * 240 / 6144)  # 64x64 -> 16 tokens on the official mu line


def test_raw128_starts_from_the_raw_ema_and_trains_at_128(run_dir, tmp_path):
    from safetensors.torch import load_file

    init = T.list_checkpoints(run_dir / "raw")[-1]
    cfg = T.stage_config("raw128", steps=1, batch=2, pool=4, ckpt_every=1, log_every=1)
    assert cfg.image_size == T.SHIPPED_IMAGE_SIZE == 128
    tr = T.Raw128Trainer(cfg, tmp_path / "r", 7, weights=run_dir / "weights", init=init, log=lambda m: None)
    # the pool holds 128x128 renders: 16x16 latents, 64 image tokens
    assert tuple(tr.pool.shape) == (4, 16, 16, 16)
    assert np.isclose(tr.mu, T.nano_mu(128)) and tr.mu != T.nano_mu()
    tr.start_from(init)
    ema = load_file(str(init / "ema.safetensors"))
    state = tr.model.state_dict()
    assert sorted(state) == sorted(ema) and all(torch.equal(state[k], ema[k]) for k in ema)
    assert all(torch.equal(tr.ema[k], ema[k]) for k in ema)
    # without a raw checkpoint to start from, the stage says what to run first
    with pytest.raises(SystemExit, match="raw stage first"):
        T.Raw128Trainer(cfg, tmp_path / "none", 7, weights=run_dir / "weights", init=None, log=lambda m: None).run()


def test_turbo_distils_at_the_shipped_size(run_dir):
    cfg = T.stage_config("turbo", batch=2, pool=8, teacher_substeps=1)
    assert cfg.image_size == 128
    tr = T.TurboTrainer(cfg, run_dir / "turbo-size", 0, weights=run_dir / "weights", log=lambda m: None)
    loss, info = tr.loss(0)
    assert math.isfinite(float(loss.detach())) and 0 <= float(info["interval"]) < T.TURBO_STEPS


def test_object_weights_cover_the_objects_and_keep_the_loss_scale():
    w = T.object_weights(0, [0, 1, 2, 3], 16, 4.0)
    assert w.shape == (4, 1, 16, 16) and set(torch.unique(w).tolist()) <= {1.0, 5.0}
    for b, i in enumerate(range(4)):
        scene = T.world_scene(0, "train", i)
        for obj in scene.objects:  # every object's centre latent pixel is weighted
            cx, cy = int((obj.col + 0.5) * 16 / 3), int((obj.row + 0.5) * 16 / 3)
            assert w[b, 0, cy, cx] == 5.0, (i, obj)
        assert 0.02 < float((w[b] > 1).float().mean()) < 0.6  # objects (grown by a pixel), not the picture
    # uniform weights give exactly the plain MSE
    dit = T.new_nano_dit(5)
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    hidden, mask = torch.randn(2, 5, 12, 64), torch.ones(2, 5, dtype=torch.bool)
    plain = T.flow_matching_loss(dit, x0, hidden, mask, torch.Generator().manual_seed(3), 0.5)[0]
    ones = T.flow_matching_loss(dit, x0, hidden, mask, torch.Generator().manual_seed(3), 0.5,
                                torch.ones(2, 1, 8, 8))[0]
    assert torch.allclose(plain, ones, rtol=1e-6)


def test_phases_change_the_loss_and_rate_from_their_step(run_dir, tmp_path):
    init = T.list_checkpoints(run_dir / "raw")[-1]

    def loss_at(step, **cfg):
        c = T.stage_config("raw128", batch=2, pool=4, **cfg)
        tr = T.Raw128Trainer(c, tmp_path / "r", 7, weights=run_dir / "weights", init=init, log=lambda m: None)
        tr.start_from(init)
        return float(tr.loss(step)[0].detach())

    plain = loss_at(3)
    focus = {"object_weight": 4.0, "t_offset": 1.0}
    assert loss_at(3, phases=((4, focus),)) == plain    # before the phase starts
    assert loss_at(3, phases=((3, focus),)) != plain    # from it on
    assert loss_at(3, phases=((3, focus),)) == loss_at(3, **focus)
    cfg = T.stage_config("raw128", lr=1e-3, warmup=1, phases=((2, focus), (5, {"lr": 2e-4})))
    assert [T.lr_at(cfg, s) for s in (0, 4, 5, 9)] == [1e-3, 1e-3, 2e-4, 2e-4]
    assert T.settings_at(cfg, 2).object_weight == 4.0 and T.settings_at(cfg, 1).object_weight == 0.0
