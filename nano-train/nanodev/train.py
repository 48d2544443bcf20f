"""Train the nano models on the synthetic world (:mod:`nanodev.world`), on CPU.

    PYTHONPATH=nano-train python -m nanodev.train {vae,raw,raw128,turbo,all} --out DIR [--steps N] [--resume]

Stages (each one resumable, deterministic from ``--seed``):

* ``vae``: the Qwen-Image VAE at nano width (``configs.vae_config()``) on fresh world renders:
  L1 + L2 reconstruction plus a small KL term on the posterior (the decoder sees sampled
  latents, so it tolerates the DiT's imperfect latents). At the end the per-channel mean/std of
  the training posterior means become ``latents_mean``/``latents_std`` of the exported config,
  so ``QwenImageVAE.encode`` hands the transformer unit-variance latents. The posterior
  log-variance starts at -6 and AdamW runs at 3e-4 (1e-3 diverged). Measured: the held-out
  PSNR sits at the background-only level (~19 dB) for ~600 steps, then the objects come in.
  ``--resume --steps S`` with S at or below the last checkpoint just re-exports that checkpoint.
* text encoder (built before ``raw``): the Qwen3 tower of ``configs.text_config`` at a seeded
  random init, with a byte-level BPE trained on world captions; ``raw`` then trains it.
  It started frozen, and that capped held-out adherence at 0.53-0.55: the DiT's text fusion
  has no positions, so which colour and place belong to which shape must come from the
  encoder's context mixing, and a random causal tower mixes its context almost uniformly.
  Trained with the DiT (``--train-text``, the default) it reached 0.64, with position 0.65 ->
  0.90 and colour 0.50 -> 0.69 (src/krea2kit/nano/weights/MODEL_CARD.md).
* ``raw``: ``SingleStreamDiT(configs.dit_config())`` (and the text tower, one optimizer and
  EMA over both: :class:`DiTWithText`) with flow matching in the official
  convention (``x_t = t * noise + (1 - t) * x0``, target ``v = noise - x0``). ``t`` is
  logit-normal with location ``mu = resolution_mu(tokens)``: ``sigmoid(N(mu, 1))`` is exactly
  a standard logit-normal pushed through the sampler's time shift ``e^mu``, so training spends
  its effort where :func:`krea2kit.sampling.flow_sigmas` puts the sampling steps. 10% of the
  captions become ``""`` (the official negative prompt) so classifier-free guidance works.
  AdamW, linear warm-up, grad-norm clip 1, EMA of the weights (exported: the transformer to
  ``weights/raw``, the tower over ``weights/text_encoder``).
* ``raw128`` (v2, what ships): the raw stage continued at 128x128 (64 image tokens, objects of
  2.5-4 latent pixels instead of 1-2) from the raw stage's EMA, same VAE. A ``phases`` entry
  switches the loss at step 1,250 to weigh object pixels 5x (:func:`object_weights`) and to draw
  noisier times (logit-normal location + 1): with the plain loss the transformer relearned
  places but left shapes at chance, because it chose them at high noise, where a plain MSE
  spends little gradient on a few object pixels (measured; MODEL_CARD.md).
* ``turbo``: distilled from the exported Raw (at 128x128) for 8 Euler steps at guidance 0 on
  ``flow_sigmas(8, 1.15)``. Method ("per-step trajectory regression", on-policy): each update
  picks one of the 8 intervals ``[s_k, s_k+1]``, rolls the *student* from pure noise through
  the first k steps (no grad, so it learns on the states it will really visit), runs the
  *teacher* with CFG (guidance 3.5, the Raw preset's) in ``--teacher-substeps`` Euler substeps
  across the interval, and regresses the student's velocity on the secant
  ``(x_teacher(s_k+1) - x) / (s_k+1 - s_k)``: one student Euler step then lands where the
  guided teacher would. The student starts from the Raw weights; EMA exported.

Layout of ``--out``: ``<stage>/ckpt-NNNNNNN/`` checkpoints (``model.safetensors``,
``ema.safetensors``, ``optimizer.safetensors``, ``state.json``: never pickles), ``<stage>/log.jsonl``
and the exported weights in the package layout under ``weights/`` (``vae/`` diffusers keys +
config.json, ``text_encoder/`` HF keys + tokenizer, ``raw/`` and ``turbo/`` native single files),
loadable with ``load_qwen_vae``, ``load_text_encoder`` and ``load_dit``.

Determinism: every random draw of step ``n`` comes from generators seeded with
``(seed, stage, n)``, so a resumed run continues exactly as an uninterrupted one.

Throughput measured on the 2-core dev machine (1 torch thread each, two runs side by side):
vae ~2.85 steps/s at batch 16; raw ("m" DiT + text tower) ~1.15 steps/s at batch 32, ~1.9 with
the "s" DiT and a frozen tower; raw128 ~0.75-0.9 steps/s at batch 32; turbo at 128x128 ~0.6 steps/s
at batch 16 with 4 teacher substeps.
``--threads`` defaults to 1: with 2 threads on busy shared cores OpenMP spinning made steps up
to 50x slower (measured); raise it on a dedicated machine.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# checkpoint files and optimizer state as safetensors + JSON (never pickle): the same writer and
# files `krea2kit train` resumes from
from krea2kit.train.checkpoint import load_tensors, optimizer_from_files, optimizer_to_files, save_tensors

DEFAULT_SEED = 20261125
STAGES = ("vae", "raw", "raw128", "turbo")
RAW_STAGES = ("raw", "raw128")  # the flow-matching stages (their CLI options apply to both)
STAGE_IDS = {"vae": 1, "raw": 2, "turbo": 3, "pool": 4, "raw128": 5}
CKPT_PREFIX = "ckpt-"
KEEP_CHECKPOINTS = 2
FORMAT = 1

# World images of the first stages are 64x64 (world.REFERENCE_SIZE): 8x8 latents, a 4x4 grid of
# 16 image tokens. The shipped (v2) models then train at 128x128 (the same world drawn twice as
# large: 16x16 latents, 64 image tokens), where an object spans 2.5-4 latent pixels, not 1-2.
IMAGE_SIZE = 64
SHIPPED_IMAGE_SIZE = 128
# Raw caption dropout: the official negative prompt is "", so that is the unconditional text.
CAPTION_DROPOUT = 0.10
UNCOND_PROMPT = ""
# Turbo: 8 steps at the distilled shift (official Turbo: fixed mu 1.15, guidance 0).
TURBO_STEPS = 8
# Teacher guidance (Krea convention g: v = c + g (c - u)); the nano Raw preset's default.
TEACHER_GUIDANCE = 3.5
# Pixel PSNR peak: images live in [-1, 1].
PSNR_PEAK = 2.0


@dataclass(frozen=True)
class StageConfig:
    """Hyper-parameters of one stage (the CLI overrides a few)."""

    steps: int
    batch: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    ckpt_every: int = 500
    log_every: int = 25
    eval_every: int = 250
    ema: float = 0.0          # 0: no EMA
    grad_clip: float = 1.0
    kl_weight: float = 0.0    # vae only
    pool: int = 0             # raw/turbo: number of pre-encoded training latents
    teacher_substeps: int = 4  # turbo only
    dit_size: str = "m"       # raw: a key of configs.DIT_SIZES
    train_text: bool = True   # raw: train the text tower with the transformer
    eval_images: int = 64     # vae: held-out scenes for the PSNR
    stats_images: int = 1024  # vae: training scenes for latents_mean / latents_std
    image_size: int = IMAGE_SIZE  # raw/raw128/turbo: side of the world renders (and so the token grid)
    object_weight: float = 0.0    # raw/raw128: extra loss weight on object pixels (0: plain MSE)
    t_offset: float = 0.0         # raw/raw128: added to the logit-normal location (> 0: noisier draws)
    # Settings that change during the stage: ((from_step, {"field": value, ...}), ...), applied in
    # order (e.g. the object-focused loss after the first steps, a lower learning rate at the end).
    phases: tuple = ()


RAW128_STEPS = 4750  # the shipped checkpoint (nano-train/raw128/; chosen on other held-out captions)

DEFAULTS: dict[str, StageConfig] = {
    # lr 1e-3 diverged within 100 steps (measured); 3e-4 is stable. ~4.5 steps/s at batch 16, 2 threads.
    "vae": StageConfig(steps=8000, batch=16, lr=3e-4, warmup=100, kl_weight=1e-5, ckpt_every=250, eval_every=250),
    # lr 1e-3 (chosen, not swept); the text tower trains too: frozen, the held-out adherence
    # plateaued at 0.53-0.55 (3,500-5,000 steps), trained it reached 0.63 by 3,000 (MODEL_CARD.md).
    "raw": StageConfig(steps=4500, batch=32, lr=1e-3, warmup=500, weight_decay=0.01, ema=0.999, pool=16384,
                       ckpt_every=500, eval_every=0),
    # v2: the Raw at 128x128, warm-started from the 64x64 raw stage's EMA (transformer and text
    # tower): it already binds colour and place, and the VAE's latents mean the same at both
    # sizes (held-out reconstructions at 128: adherence 0.97, shape 0.91; at 64: 0.95, 0.85).
    # The plain loss relearns places on the larger grid (1,250 steps) but leaves shapes at
    # chance; from then on the loss weighs object pixels 5x and draws noisier times, where the
    # shape is chosen from the text (MODEL_CARD.md "Why the object-focused phase").
    "raw128": StageConfig(steps=RAW128_STEPS, batch=32, lr=1e-3, warmup=200, weight_decay=0.01, ema=0.999,
                          pool=16384, ckpt_every=250, eval_every=0, image_size=SHIPPED_IMAGE_SIZE,
                          phases=((1250, {"object_weight": 4.0, "t_offset": 1.0}),)),
    # v2: 300 steps (a trial distilled from the step-3,500 Raw scored 0.803 / 0.822 / 0.811 held out
    # at 150 / 300 / 450 steps against its teacher's 0.830; v1 peaked at 250 of 1,000); EMA 0.995
    # so the short run's average is recent.
    "turbo": StageConfig(steps=300, batch=16, lr=3e-4, warmup=100, weight_decay=0.01, ema=0.995, pool=16384,
                         ckpt_every=100, eval_every=0, image_size=SHIPPED_IMAGE_SIZE),
}


# --------------------------------------------------------------------------------------------
# Randomness: everything of step n is drawn from (seed, stage, n)

def step_seed(seed: int, stage: str, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), STAGE_IDS[stage], int(step)]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


def step_rngs(seed: int, stage: str, step: int) -> tuple[torch.Generator, np.random.Generator]:
    s = step_seed(seed, stage, step)
    return torch.Generator().manual_seed(s), np.random.default_rng(s)


# --------------------------------------------------------------------------------------------
# World access

def _world():
    from nanodev import world

    return world


def world_scene(seed: int, split: str, index: int):
    """Scene ``index`` of ``world.dataset(seed, ..., split)`` (same draw, no iteration)."""
    w = _world()
    return w.sample_scene(w.item_rng(seed, split, index), split)


def world_item(seed: int, split: str, index: int, size: int = IMAGE_SIZE):
    """(image, caption, scene) exactly as ``world.dataset`` yields item ``index``."""
    w = _world()
    rng = w.item_rng(seed, split, index)
    scene = w.sample_scene(rng, split)
    return w.render(scene, size), w.caption(scene, rng), scene


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)))
    return 10.0 * math.log10(PSNR_PEAK**2 / max(mse, 1e-12))


# --------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, never pickles)

def checkpoint_step(path: Path) -> int:
    """The optimizer step of a ``ckpt-NNNNNNN`` folder."""
    return int(Path(path).name[len(CKPT_PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None, extra: dict) -> Path:
    """Write ``ckpt-<step>`` atomically (a temp folder renamed into place); keep the last few."""
    final = run_dir / f"{CKPT_PREFIX}{step:07d}"
    tmp = run_dir / f".tmp-{CKPT_PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(model.state_dict(), tmp / "model.safetensors")
    if ema is not None:
        save_tensors(ema, tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_to_files(opt)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    state = {"format": FORMAT, "step": step, "optimizer": opt_meta, "extra": extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None) -> dict:
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    model.load_state_dict(load_tensors(path / "model.safetensors"))
    optimizer_from_files(opt, load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    if ema is not None:
        saved = load_tensors(path / "ema.safetensors")
        for k in ema:
            ema[k].copy_(saved[k])
    return state


# --------------------------------------------------------------------------------------------
# Training loop shared by the stages

def settings_at(cfg: StageConfig, step: int) -> StageConfig:
    """``cfg`` with every phase that has started by ``step`` applied."""
    for start, changes in cfg.phases:
        if step >= int(start):
            cfg = replace(cfg, **changes)
    return replace(cfg, phases=()) if cfg.phases else cfg


def lr_at(cfg: StageConfig, step: int) -> float:
    """Linear warm-up, then constant, or the phase's rate (no total-length dependence, so
    resuming with a larger ``--steps`` continues the same schedule)."""
    return settings_at(cfg, step).lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def ema_decay(cfg: StageConfig, step: int) -> float:
    # Warm-up of the decay so the average is not dominated by the initial weights.
    return min(cfg.ema, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
        else:
            ema[k].copy_(v)


class Trainer:
    """One stage: ``loss(step)`` gives the loss of step ``step``; :meth:`run` does the rest."""

    stage = ""

    def __init__(self, cfg: StageConfig, run_dir: Path, seed: int, model: torch.nn.Module,
                 log: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.seed, self.model = cfg, Path(run_dir), int(seed), model
        self.log = log
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                                     weight_decay=cfg.weight_decay, foreach=True)
        self.ema = ({k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.ema > 0 else None)
        self.step = 0
        self.history: list[dict] = []

    # -- to implement ---------------------------------------------------------------------
    def loss(self, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict:
        return {}

    # -- the loop ---------------------------------------------------------------------------
    def update(self, loss: torch.Tensor) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            ema_update(self.ema, self.model, ema_decay(self.cfg, self.step))
        self.step += 1
        return float(norm)

    def resume(self) -> bool:
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return False
        state = load_checkpoint(ckpts[-1], self.model, self.opt, self.ema)
        self.step = int(state["step"])
        # Drop log records of steps after the checkpoint (they will be redone identically).
        log_file = self.run_dir / "log.jsonl"
        if log_file.is_file():
            kept = [line for line in log_file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            log_file.write_text("".join(line + "\n" for line in kept))
        self.log(f"[{self.stage}] resumed from {ckpts[-1]} (step {self.step})")
        return True

    def checkpoint(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.opt, self.ema,
                               {"stage": self.stage, "seed": self.seed, "config": asdict(self.cfg)})

    def _write_log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, steps: int | None = None, *, resume: bool = False) -> None:
        total = self.cfg.steps if steps is None else int(steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        elif list_checkpoints(self.run_dir):
            raise SystemExit(f"{self.run_dir} already holds checkpoints: pass --resume or use a fresh --out")
        self.model.train()
        losses: list[float] = []
        t0, s0 = time.perf_counter(), self.step
        while self.step < total:
            loss, info = self.loss(self.step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{self.stage}] non-finite loss at step {self.step}: {info}")
            gnorm = self.update(loss)
            losses.append(float(loss.detach()))
            done = self.step
            if done % self.cfg.log_every == 0 or done == total:
                dt = time.perf_counter() - t0
                rec = {"step": done, "loss": sum(losses) / len(losses), "grad_norm": gnorm,
                       "lr": lr_at(self.cfg, done - 1), "steps_per_s": (done - s0) / max(dt, 1e-9),
                       **{k: float(v) for k, v in info.items()}}
                if self.cfg.eval_every and (done % self.cfg.eval_every == 0 or done == total):
                    self.model.eval()
                    rec.update(self.evaluate(done))
                    self.model.train()
                self._write_log(rec)
                self.log(f"[{self.stage}] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                losses.clear()
                t0, s0 = time.perf_counter(), done
            if done % self.cfg.ckpt_every == 0 or done == total:
                self.checkpoint()
        self.model.eval()

    def export_state(self) -> dict[str, torch.Tensor]:
        """Weights to ship: the EMA when there is one."""
        sd = self.ema if self.ema is not None else self.model.state_dict()
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# VAE

def _vae_norm_forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    from krea2kit.models.vae_qwen import RMS_NORM_EPS

    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(RMS_NORM_EPS) * self.scale * self.gamma


def _vae_res_forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


def _vae_attn_forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    qkv = self.to_qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, 3 * c)
    q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return self.proj(out) + x


def _vae_encoder_forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_in(x)
    for blk in self.down_blocks:
        x = blk(x)
    x = self.mid_block(x)
    return self.conv_out(F.silu(self.norm_out(x)))


def _vae_decoder_forward(self, z: torch.Tensor) -> torch.Tensor:
    x = self.mid_block(self.conv_in(z))
    for blk in self.up_blocks:
        x = blk(x)
    return self.conv_out(F.silu(self.norm_out(x)))


def make_vae_trainable(vae):
    """Give the modules of ``vae`` out-of-place forwards (same maths) so autograd can run.

    The inference forwards of :mod:`krea2kit.models.vae_qwen` overwrite activations in place to
    save memory, which autograd rejects. Only this instance changes; parameter names (and so
    the exported keys) are untouched.
    """
    from krea2kit.models import vae_qwen as vq

    table = {vq.RMSNorm2d: _vae_norm_forward, vq.ResBlock: _vae_res_forward, vq.AttentionBlock: _vae_attn_forward,
             vq.Encoder: _vae_encoder_forward, vq.Decoder: _vae_decoder_forward}
    for m in vae.modules():
        fn = table.get(type(m))
        if fn is not None:
            m.forward = types.MethodType(fn, m)
    vae.batch_slicing = False
    return vae.requires_grad_(True)


def new_nano_vae(seed: int):
    from krea2kit.models.vae_qwen import QwenImageVAE
    from nanodev import configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = QwenImageVAE(configs.vae_config())
    with torch.no_grad():
        # Start with a narrow posterior: at the default logvar ~ 0 the sampled latents are
        # mostly noise and the decoder first learns the mean image (measured: stuck ~19 dB).
        vae.quant_conv.bias[vae.config.z_dim:].fill_(VAE_LOGVAR_INIT)
    return make_vae_trainable(vae)


# Initial posterior log-variance (std e^-3 ~ 0.05); the KL term then regularises it.
VAE_LOGVAR_INIT = -6.0


def vae_posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the posterior, as diffusers' AutoencoderKLQwenImage splits quant_conv."""
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, dict]:
    mean, logvar = vae_posterior(vae, x)
    eps = torch.randn(mean.shape, generator=generator)
    z = mean + torch.exp(0.5 * logvar) * eps
    rec = vae.decoder(vae.post_quant_conv(z))
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


class VAETrainer(Trainer):
    stage = "vae"

    def __init__(self, cfg: StageConfig, run_dir: Path, seed: int, *, log=print):
        super().__init__(cfg, run_dir, seed, new_nano_vae(seed), log)
        self.eval_images = cfg.eval_images
        self._eval_x: torch.Tensor | None = None

    def batch(self, step: int) -> torch.Tensor:
        # Fresh scenes every step: item indices step*B .. step*B+B-1 of the train split.
        b = self.cfg.batch
        return images_to_tensor([world_item(self.seed, "train", step * b + j)[0] for j in range(b)])

    def loss(self, step: int):
        gen, _ = step_rngs(self.seed, self.stage, step)
        return vae_loss(self.model, self.batch(step), gen, self.cfg.kl_weight)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        if self._eval_x is None:
            self._eval_x = images_to_tensor([world_item(self.seed, "heldout", i)[0] for i in range(self.eval_images)])
        return {"psnr_heldout": reconstruction_psnr(self.model, self._eval_x)}

    def latent_stats(self, count: int = 1024, batch: int = 64) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of the posterior means of ``count`` training scenes."""
        zs = []
        with torch.no_grad():
            for start in range(0, count, batch):
                x = images_to_tensor([world_item(self.seed, "train", i)[0]
                                      for i in range(start, min(count, start + batch))])
                zs.append(vae_posterior(self.model, x)[0])
        z = torch.cat(zs).transpose(0, 1).reshape(zs[0].shape[1], -1).double()
        return z.mean(1).tolist(), z.std(1).tolist()

    def export(self, folder: Path) -> Path:
        mean, std = self.latent_stats(self.cfg.stats_images)
        return export_vae(self.export_state(), mean, std, folder, seed=self.seed, step=self.step)


@torch.no_grad()
def reconstruction_psnr(vae, x: torch.Tensor) -> float:
    """PSNR (dB, peak 2 on [-1, 1]) of the deterministic (posterior-mean) reconstruction."""
    mean, _ = vae_posterior(vae, x)
    return psnr(vae.decoder(vae.post_quant_conv(mean)), x)


def export_vae(state: dict[str, torch.Tensor], latents_mean: Sequence[float], latents_std: Sequence[float],
               folder: Path, *, seed: int, step: int) -> Path:
    """The diffusers layout: ``model.safetensors`` (AutoencoderKLQwenImage keys) + ``config.json``
    carrying the measured latent statistics (the loader reads them from there)."""
    from krea2kit.models.weights import save_safetensors_atomic
    from nanodev import configs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = replace(configs.vae_config(), latents_mean=tuple(float(m) for m in latents_mean),
                  latents_std=tuple(float(s) for s in latents_std))
    meta = {"krea2kit": "nano VAE trained on the nano world", "seed": str(seed), "step": str(step)}
    save_safetensors_atomic(state, folder / "model.safetensors", meta)
    config = {"_class_name": "AutoencoderKLQwenImage", **cfg.to_diffusers_kwargs()}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


# --------------------------------------------------------------------------------------------
# Text encoder (seeded random init; the raw stage trains it)

TOKENIZER_CORPUS_SIZE = 4000
# Key prefix of the exported tower: the transformers Qwen3-VL layout the text loader reads.
TEXT_PREFIX = "model.language_model."


def export_text_encoder(folder: Path, seed: int) -> Path:
    """Tokenizer trained on world captions + the seeded random Qwen3 tower, HF folder layout."""
    from krea2kit.models.text_encoder import Qwen3TextTower
    from krea2kit.models.tokenizer import DEFAULT_TINY_CORPUS, build_tiny_tokenizer
    from krea2kit.models.weights import save_safetensors_atomic
    from nanodev import configs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = list(DEFAULT_TINY_CORPUS) + _world().caption_corpus(seed, TOKENIZER_CORPUS_SIZE)
    tokenizer = build_tiny_tokenizer(folder, vocab_size=configs.NANO_TOKENIZER_VOCAB, corpus=corpus)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 20)
        tower = Qwen3TextTower(configs.text_config(tokenizer.get_vocab_size()))
    meta = {"krea2kit": "nano text encoder: seeded random init (the raw stage trains it)",
            "seed": str(seed)}
    save_safetensors_atomic({TEXT_PREFIX + k: v for k, v in tower.state_dict().items()},
                            folder / "model.safetensors", meta)
    (folder / "krea2kit.json").write_text(json.dumps({"taps": list(configs.NANO_TAPS)}) + "\n")
    return folder


def export_text_tower(state: dict[str, torch.Tensor], folder: Path, *, seed: int, step: int) -> Path:
    """Replace the tower weights of an exported text encoder folder (tokenizer untouched)."""
    from krea2kit.models.weights import save_safetensors_atomic

    meta = {"krea2kit": "nano text encoder: trained with the nano Raw on the nano world", "seed": str(seed),
            "step": str(step)}
    save_safetensors_atomic(state, Path(folder) / "model.safetensors", meta)
    return Path(folder)


def load_nano_text_encoder(folder: Path):
    from krea2kit.conditioning import load_text_encoder
    from nanodev import configs

    te = load_text_encoder(folder, taps=configs.NANO_TAPS, dtype=torch.float32)
    # Real tokens only: equal to the official padded layout to ~1e-6 in fp32, ~10x less work.
    te.exact_layout = False
    return te


# --------------------------------------------------------------------------------------------
# DiT stages

def nano_mu(size: int = IMAGE_SIZE) -> float:
    from krea2kit.sampling import image_tokens, resolution_mu

    return resolution_mu(image_tokens(size, size))


def sample_t(generator: torch.Generator, batch: int, mu: float) -> torch.Tensor:
    """Logit-normal times with location ``mu``: ``sigmoid(N(0,1) + mu)`` equals the sampler's
    shift ``e^mu / (e^mu + 1/u - 1)`` applied to a standard logit-normal ``u``."""
    return torch.sigmoid(torch.randn(batch, generator=generator) + mu)


def build_latent_pool(vae, seed: int, count: int, batch: int = 64, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Normalised latents (``vae.encode``) of train items 0..count-1 rendered at ``size``."""
    out = []
    vae.batch_slicing = False
    with torch.no_grad():
        for start in range(0, count, batch):
            x = images_to_tensor([world_item(seed, "train", i, size)[0]
                                  for i in range(start, min(count, start + batch))])
            out.append(vae.encode(x, tile=None).float())
    return torch.cat(out)


def cached_latent_pool(run_dir: Path, vae_folder: Path, seed: int, count: int, log=print,
                       size: int = IMAGE_SIZE) -> torch.Tensor:
    """The pool, cached beside the run (keyed by the VAE file's size/mtime and the count)."""
    st = (Path(vae_folder) / "model.safetensors").stat()
    cfg_file = Path(vae_folder) / "config.json"
    digest = hashlib.sha256(cfg_file.read_bytes() if cfg_file.is_file() else b"").hexdigest()[:16]
    key = f"{seed}-{count}-{st.st_size}-{st.st_mtime_ns}-{digest}" + (f"-{size}px" if size != IMAGE_SIZE else "")
    path = Path(run_dir) / "latent_pool.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("latents")
    from krea2kit.models.vae_qwen import load_qwen_vae
    from krea2kit.models.weights import save_safetensors_atomic

    t0 = time.perf_counter()
    vae = load_qwen_vae(vae_folder, dtype=torch.float32)
    pool = build_latent_pool(vae, seed, count, size=size)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({"latents": pool}, path, {"key": key})
    log(f"encoded a pool of {count} latents in {time.perf_counter() - t0:.1f}s "
        f"(mean {pool.mean():.3f}, std {pool.std():.3f})")
    return pool


def pool_captions(seed: int, indices: Sequence[int], rng: np.random.Generator) -> list[str]:
    """A fresh caption of each pool scene (paraphrase augmentation; deterministic per step)."""
    w = _world()
    return [w.caption(world_scene(seed, "train", int(i)), rng) for i in indices]


def encode_text(te, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, mask = te.encode(list(prompts))
    return hidden.clone(), mask.clone()


def encode_text_trainable(te, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``te.encode`` (compact layout) with autograd through the tower."""
    tokens = te.tokenize(list(prompts), warn=False)
    compact = te.compact_hidden(tokens, range(len(prompts)))
    return te.assemble(tokens, compact, tokens.trimmed_length)


class DiTWithText(torch.nn.Module):
    """The raw stage's trainable pair when the text tower learns too: one optimizer, EMA and
    checkpoint cover both (keys ``dit.*`` and ``tower.*``); the export splits them again."""

    def __init__(self, dit: torch.nn.Module, tower: torch.nn.Module):
        super().__init__()
        self.dit, self.tower = dit, tower


def split_dit_with_text(state: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """(transformer state, text tower state in the HF layout or None) of a raw-stage state."""
    if not any(k.startswith("dit.") for k in state):
        return state, None
    dit = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    tower = {TEXT_PREFIX + k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")}
    return dit, tower


def new_nano_dit(seed: int, size: str = "m"):
    from krea2kit.models.dit import SingleStreamDiT
    from nanodev import configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SingleStreamDiT(configs.dit_config(size))


def dit_velocity(dit, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Velocity (B, C, h, w) with grads, through the same forward the denoiser uses (compact text)."""
    from krea2kit.models.dit import patchify, unpatchify

    p = dit.config.patch
    grid = (x.shape[2] // p, x.shape[3] // p)
    out = dit(patchify(x, p), t, txt=hidden, txt_mask=mask, grid_hw=grid)
    return unpatchify(out, grid, p)


def flow_matching_loss(dit, x0: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                       generator: torch.Generator, mu: float, weights: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict]:
    """Flow-matching MSE; ``weights`` (B, 1, h, w), when given, weighs latent pixels (normalised
    by their mean, so the loss keeps its scale)."""
    b = x0.shape[0]
    t = sample_t(generator, b, mu)
    noise = torch.randn(x0.shape, generator=generator)
    tb = t.view(b, 1, 1, 1)
    xt = tb * noise + (1.0 - tb) * x0
    v = dit_velocity(dit, xt, t, hidden, mask)
    if weights is None:
        loss = F.mse_loss(v, noise - x0)
    else:
        w = weights.expand_as(v)
        loss = (w * (v - (noise - x0)).square()).sum() / w.sum()
    return loss, {"t_mean": t.mean()}


def object_weights(seed: int, indices: Sequence[int], latent_side: int, weight: float) -> torch.Tensor:
    """(B, 1, h, w) loss weights of pool scenes: 1 on the background, ``1 + weight`` on the latent
    pixels an object covers (its mask at latent resolution, grown by one latent pixel: the VAE
    decodes an edge from its neighbours too). Objects are a few percent of a picture, so a plain
    MSE spends most of its gradient on the background; this puts it where the shapes are."""
    w = _world()
    covered = np.zeros((len(indices), 1, latent_side, latent_side), np.float32)
    for b, i in enumerate(indices):
        for obj in world_scene(seed, "train", int(i)).objects:
            covered[b, 0] = np.maximum(covered[b, 0], w._shape_mask(obj, latent_side) > 0.05)
    grown = F.max_pool2d(torch.from_numpy(covered), 3, stride=1, padding=1)  # one latent pixel wider
    return 1.0 + weight * grown


def _pool_size(cfg: StageConfig) -> int:
    if cfg.pool < 1:
        raise ValueError("the raw/turbo stages need pool >= 1")
    return cfg.pool


class RawTrainer(Trainer):
    stage = "raw"

    def __init__(self, cfg: StageConfig, run_dir: Path, seed: int, *, weights: Path, log=print):
        te = load_nano_text_encoder(Path(weights) / "text_encoder")
        dit = new_nano_dit(seed + 1, cfg.dit_size)
        model = DiTWithText(dit, te.tower.requires_grad_(True)) if cfg.train_text else dit
        super().__init__(cfg, run_dir, seed, model, log)
        self.te = te
        self.pool = cached_latent_pool(run_dir, Path(weights) / "vae", seed, _pool_size(cfg), log, cfg.image_size)
        self.mu = nano_mu(cfg.image_size)

    def batch(self, step: int, rng: np.random.Generator):
        idx = rng.integers(0, self.pool.shape[0], self.cfg.batch)
        captions = pool_captions(self.seed, idx, rng)
        drop = rng.random(len(captions)) < CAPTION_DROPOUT
        captions = [UNCOND_PROMPT if d else c for c, d in zip(captions, drop)]
        return self.pool[torch.from_numpy(idx)], captions, idx

    def loss(self, step: int):
        gen, rng = step_rngs(self.seed, self.stage, step)
        x0, captions, idx = self.batch(step, rng)
        now = settings_at(self.cfg, step)
        weights = (object_weights(self.seed, idx, x0.shape[-1], now.object_weight)
                   if now.object_weight > 0 else None)
        mu = self.mu + now.t_offset
        if self.cfg.train_text:
            hidden, mask = encode_text_trainable(self.te, captions)
            return flow_matching_loss(self.model.dit, x0, hidden, mask, gen, mu, weights)
        hidden, mask = encode_text(self.te, captions)
        return flow_matching_loss(self.model, x0, hidden, mask, gen, mu, weights)


class Raw128Trainer(RawTrainer):
    """The raw stage continued at 128x128 (v2): same model, loss and data, four times the tokens.

    A fresh run starts from the EMA of ``init`` (the 64x64 raw stage's last checkpoint) for the
    weights and their EMA, with a fresh optimizer (its warm-up re-estimates the moments at the
    new resolution); ``--resume`` continues its own checkpoints instead."""

    stage = "raw128"

    def __init__(self, cfg: StageConfig, run_dir: Path, seed: int, *, weights: Path, init: Path | None, log=print):
        super().__init__(cfg, run_dir, seed, weights=weights, log=log)
        self.init = init

    def start_from(self, ckpt: Path) -> None:
        state = load_tensors(Path(ckpt) / "ema.safetensors")
        self.model.load_state_dict(state)
        for k, v in self.model.state_dict().items():
            self.ema[k].copy_(v)
        self.log(f"[{self.stage}] initialised from the EMA of {ckpt}")

    def run(self, steps: int | None = None, *, resume: bool = False) -> None:
        if not (resume and list_checkpoints(self.run_dir)):
            if self.init is None:
                raise SystemExit("raw128 starts from a raw checkpoint: run the raw stage first (or pass --init)")
            self.start_from(self.init)
        super().run(steps, resume=resume)


class TurboTrainer(Trainer):
    stage = "turbo"

    def __init__(self, cfg: StageConfig, run_dir: Path, seed: int, *, weights: Path, log=print):
        from krea2kit.models.dit_loader import load_dit
        from krea2kit.sampling import DISTILLED_MU, flow_sigmas

        # The export is fp16; both train in fp32 (AdamW's eps underflows in fp16 parameters).
        teacher = load_dit(Path(weights) / "raw", dtype=torch.float32)
        student = load_dit(Path(weights) / "raw", dtype=torch.float32).requires_grad_(True)
        super().__init__(cfg, run_dir, seed, student, log)
        self.teacher = teacher.eval().requires_grad_(False)
        self.te = load_nano_text_encoder(Path(weights) / "text_encoder")
        self.pool_size = _pool_size(cfg)
        self.sigmas = flow_sigmas(TURBO_STEPS, DISTILLED_MU).tolist()
        self.uncond = encode_text(self.te, [UNCOND_PROMPT])

    def targets(self, noise: torch.Tensor, hidden, mask, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """State at ``sigmas[k]`` along the student's own rollout, and the teacher's secant velocity."""
        from krea2kit.denoiser import Krea2Denoiser

        s = self.sigmas
        x = noise
        with torch.no_grad():
            if k:
                was = self.model.training
                self.model.eval()
                student = Krea2Denoiser(self.model, hidden, mask, guidance=0.0, layout="compact")
                for j in range(k):
                    x = x + (s[j + 1] - s[j]) * student(x, s[j])
                self.model.train(was)
            teacher = Krea2Denoiser(self.teacher, hidden, mask, uncond_txt=self.uncond[0],
                                    uncond_mask=self.uncond[1], guidance=TEACHER_GUIDANCE, layout="compact")
            sub = np.linspace(s[k], s[k + 1], self.cfg.teacher_substeps + 1).tolist()
            y = x
            for a, b in itertools.pairwise(sub):
                y = y + (b - a) * teacher(y, a)
        return x, (y - x) / (s[k + 1] - s[k])

    def loss(self, step: int):
        gen, rng = step_rngs(self.seed, self.stage, step)
        idx = rng.integers(0, self.pool_size, self.cfg.batch)
        captions = pool_captions(self.seed, idx, rng)
        k = int(rng.integers(0, TURBO_STEPS))
        hidden, mask = encode_text(self.te, captions)
        side = self.cfg.image_size // 8
        noise = torch.randn((self.cfg.batch, 16, side, side), generator=gen)
        x, v_target = self.targets(noise, hidden, mask, k)
        t = torch.full((x.shape[0],), self.sigmas[k])
        v = dit_velocity(self.model, x, t, hidden, mask)
        return F.mse_loss(v, v_target), {"interval": torch.tensor(float(k))}


# Shipped transformer precision: fp16 halves the files (two DiTs in fp32 would take the package
# past its 20 MB budget) and keeps 10 mantissa bits; the CPU pipeline upcasts to fp32 on load.
EXPORT_DIT_DTYPE = torch.float16


def export_dit(state: dict[str, torch.Tensor], folder: Path, *, what: str, seed: int, step: int) -> Path:
    """The native single-file layout (``model.safetensors`` with the official keys), in
    :data:`EXPORT_DIT_DTYPE`; checkpoints keep fp32."""
    from krea2kit.models.weights import save_safetensors_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"krea2kit": f"nano {what} trained on the nano world", "seed": str(seed), "step": str(step),
            "dtype": str(EXPORT_DIT_DTYPE).removeprefix("torch.")}
    state = {k: v.to(EXPORT_DIT_DTYPE) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors_atomic(state, folder / "model.safetensors", meta)
    return folder


# --------------------------------------------------------------------------------------------
# Stage drivers

def stage_config(stage: str, **overrides) -> StageConfig:
    cfg = DEFAULTS[stage]
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def run_vae(out: Path, cfg: StageConfig, *, seed: int = DEFAULT_SEED, resume: bool = False,
            log=print) -> VAETrainer:
    tr = VAETrainer(cfg, Path(out) / "vae", seed, log=log)
    tr.run(resume=resume)
    tr.export(Path(out) / "weights" / "vae")
    log(f"[vae] exported {Path(out) / 'weights' / 'vae'}")
    return tr


def ensure_text_encoder(out: Path, seed: int, log=print) -> Path:
    folder = Path(out) / "weights" / "text_encoder"
    if not (folder / "model.safetensors").is_file():
        export_text_encoder(folder, seed)
        log(f"[text] exported {folder} (seeded random init)")
    return folder


def run_raw(out: Path, cfg: StageConfig, *, seed: int = DEFAULT_SEED, resume: bool = False, log=print) -> RawTrainer:
    weights = Path(out) / "weights"
    if not (weights / "vae" / "model.safetensors").is_file():
        raise SystemExit(f"{weights / 'vae'} is missing: run the vae stage first")
    ensure_text_encoder(out, seed, log)
    tr = RawTrainer(cfg, Path(out) / "raw", seed, weights=weights, log=log)
    tr.run(resume=resume)
    export_raw(tr, weights, seed, log)
    return tr


def export_raw(tr: RawTrainer, weights: Path, seed: int, log=print) -> None:
    """The EMA of a raw or raw128 run: the transformer to ``weights/raw`` and, when it trained,
    the text tower over ``weights/text_encoder`` (tokenizer untouched)."""
    dit_state, tower_state = split_dit_with_text(tr.export_state())
    export_dit(dit_state, weights / "raw", what="Raw", seed=seed, step=tr.step)
    if tower_state is not None:
        export_text_tower(tower_state, weights / "text_encoder", seed=seed, step=tr.step)
        log(f"[{tr.stage}] exported the trained text tower to {weights / 'text_encoder'}")
    log(f"[{tr.stage}] exported {weights / 'raw'}")


def run_raw128(out: Path, cfg: StageConfig, *, seed: int = DEFAULT_SEED, resume: bool = False, log=print,
               init: Path | None = None) -> Raw128Trainer:
    """The raw stage at 128x128, started from ``init`` (default: the last checkpoint of ``out/raw``)."""
    weights = Path(out) / "weights"
    if not (weights / "text_encoder" / "tokenizer.json").is_file():
        raise SystemExit(f"{weights / 'text_encoder'} is missing: run the raw stage first")
    if init is None:
        previous = list_checkpoints(Path(out) / "raw")
        init = previous[-1] if previous else None
    tr = Raw128Trainer(cfg, Path(out) / "raw128", seed, weights=weights, init=init, log=log)
    tr.run(resume=resume)
    export_raw(tr, weights, seed, log)
    return tr


def run_turbo(out: Path, cfg: StageConfig, *, seed: int = DEFAULT_SEED, resume: bool = False,
              log=print) -> TurboTrainer:
    weights = Path(out) / "weights"
    if not (weights / "raw" / "model.safetensors").is_file():
        raise SystemExit(f"{weights / 'raw'} is missing: run the raw stage first")
    tr = TurboTrainer(cfg, Path(out) / "turbo", seed, weights=weights, log=log)
    tr.run(resume=resume)
    export_dit(tr.export_state(), weights / "turbo", what="Turbo (distilled from Raw)", seed=seed, step=tr.step)
    log(f"[turbo] exported {weights / 'turbo'}")
    return tr


RUNNERS = {"vae": run_vae, "raw": run_raw, "raw128": run_raw128, "turbo": run_turbo}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanodev.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=(*STAGES, "all"))
    ap.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, weights/)")
    ap.add_argument("--steps", type=int, help="total optimizer steps of each stage run (default: per stage)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--ckpt-every", type=int)
    ap.add_argument("--log-every", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--pool", type=int, help="raw/turbo: pre-encoded training latents")
    ap.add_argument("--teacher-substeps", type=int)
    ap.add_argument("--dit-size", choices=("s", "m"), help="raw: transformer size (nanodev.configs.DIT_SIZES)")
    ap.add_argument("--train-text", action=argparse.BooleanOptionalAction, default=None,
                    help="raw: train the text tower with the transformer")
    ap.add_argument("--eval-images", type=int, help="vae: held-out scenes for the PSNR")
    ap.add_argument("--stats-images", type=int, help="vae: scenes for the latent statistics")
    ap.add_argument("--image-size", type=int, help="raw/raw128/turbo: side of the training renders")
    ap.add_argument("--object-weight", type=float, help="raw/raw128: extra loss weight on object pixels")
    ap.add_argument("--t-offset", type=float, help="raw/raw128: shift of the training times' logit-normal location")
    ap.add_argument("--init", type=Path, help="raw128: the raw checkpoint to start from (default: the last of OUT/raw)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on shared cores extra OpenMP threads spin and slow everyone)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    for stage in (STAGES if args.stage == "all" else (args.stage,)):
        cfg = stage_config(stage, steps=args.steps, batch=args.batch, lr=args.lr, ckpt_every=args.ckpt_every,
                           log_every=args.log_every, eval_every=args.eval_every,
                           pool=args.pool if stage != "vae" else None,
                           teacher_substeps=args.teacher_substeps if stage == "turbo" else None,
                           dit_size=args.dit_size if stage in RAW_STAGES else None,
                           train_text=args.train_text if stage in RAW_STAGES else None,
                           eval_images=args.eval_images, stats_images=args.stats_images,
                           image_size=args.image_size if stage != "vae" else None,
                           object_weight=args.object_weight if stage in RAW_STAGES else None,
                           t_offset=args.t_offset if stage in RAW_STAGES else None)
        extra = {"init": args.init} if stage == "raw128" else {}
        RUNNERS[stage](out, cfg, seed=args.seed, resume=args.resume, log=log, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
