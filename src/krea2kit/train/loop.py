"""The training loop: a frozen Raw transformer, trainable adapters, AdamW, checkpoints.

    trainer = Trainer(recipe, recipe_file="style.toml", events=print_events)
    result = trainer.run(resume=False)        # -> TrainResult(path=..., steps=..., ...)

One step (``n``): the batch at data position ``n`` (:class:`DataOrder`), every random draw from
a generator seeded with ``(seed, n)`` (caption dropout, timesteps, noise), the flow-matching
loss (:mod:`.objective`) or the slider loss (:mod:`.slider`), backward into the adapters
only, gradient-norm clipping, the learning rate of step ``n`` (constant or cosine, linear
warm-up), one AdamW update. A non-finite loss or gradient stops the run before the update,
so the last checkpoint stays the last good state. Every ``checkpoint_every`` steps (and at
the end) a checkpoint is written atomically (:mod:`.checkpoint`) and, when the recipe has
``[samples]``, a contact sheet of the sample prompts rendered on Turbo with the adapter.

Parts are loaded through the same registry, weights lookup and loaders as ``krea2kit run``
(a run plan for the base preset), so ``[base.weights]``, ``$OSS_RAW``, the user config and
quantized files behave as they do there.

Progress leaves through ``events(name, **data)``: ``"load"``/``"loaded"`` (parts),
``"dataset"`` (lines for people), ``"train_start"``, ``"train_step"`` (step, total, loss, lr,
steps_per_s, eta_s), ``"checkpoint"``, ``"samples"``, ``"warning"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krea2kit.errors import EXIT_RUNTIME, Krea2kitError, RecipeError, UsageError
from krea2kit.train import checkpoint as ckpt
from krea2kit.train.schema import TrainRecipe

Events = Callable[..., None]

#: Generator streams within one step (independent draws from the step's seed).
STREAM_STEP, STREAM_ORDER = 0, 1


def _no_events(event: str, **data: Any) -> None:
    pass


class TrainingError(Krea2kitError):
    """Training stopped (a non-finite loss, a missing dependency at run time)."""

    exit_code = EXIT_RUNTIME


# ---------------------------------------------------------------------------
# schedule


def lr_at(recipe: TrainRecipe, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``schedule.warmup`` steps,
    then constant or a cosine from ``lr`` down to ``min_lr · lr`` at ``steps``."""
    lr = recipe.optimizer.lr
    sched = recipe.schedule
    if sched.warmup and step < sched.warmup:
        return lr * (step + 1) / sched.warmup
    if sched.kind == "constant":
        return lr
    span = max(1, recipe.steps - sched.warmup)
    progress = min(1.0, (step - sched.warmup) / span)
    floor = sched.min_lr
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------
# data order


class DataOrder:
    """Which samples make the batch of step ``n``: a pure function of (seed, n).

    Each epoch shuffles the sample indices of every bucket with a generator seeded by
    (seed, epoch), cuts each bucket into batches of ``batch_size`` (a batch never mixes
    bucket sizes; the last one of a bucket may be smaller) and shuffles the batch list. An
    epoch always has the same number of batches, so step ``n`` is batch ``n % per_epoch`` of
    epoch ``n // per_epoch``; resuming needs only the step.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int):
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(tuple(b), []).append(i)
        self.per_epoch = sum(math.ceil(len(v) / self.batch_size) for v in self.groups.values())
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch(self, e: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        rng = np.random.default_rng(ckpt.step_seed(self.seed, e, STREAM_ORDER))
        batches: list[list[int]] = []
        for key in sorted(self.groups):
            idx = list(self.groups[key])
            order = rng.permutation(len(idx))
            idx = [idx[j] for j in order]
            batches.extend(idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size))
        perm = rng.permutation(len(batches))
        out = [batches[j] for j in perm]
        self._cache = (e, out)
        return out

    def position(self, step: int) -> tuple[int, int]:
        return step // self.per_epoch, step % self.per_epoch

    def batch(self, step: int) -> list[int]:
        e, i = self.position(step)
        return self.epoch(e)[i]


# ---------------------------------------------------------------------------
# the model


def enable_gradient_checkpointing(dit: torch.nn.Module) -> Callable[[], None]:
    """Recompute every transformer block in the backward pass instead of keeping its
    activations (the adapters' hooks run again inside the recomputation). Returns an undo."""
    from torch.utils.checkpoint import checkpoint

    originals = []
    for block in dit.blocks:
        forward = block.forward

        def wrapped(*args, _f=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        originals.append((block, forward))
        block.forward = wrapped

    def undo() -> None:
        for block, _ in originals:
            if "forward" in block.__dict__:
                del block.forward

    return undo


def turbo_base_warning(preset: str) -> str | None:
    """The warning for a Turbo base (``train`` and ``train --dry-run`` say it alike)."""
    if "turbo" not in preset:
        return None
    return (f"base.preset = {preset!r}: adapters train on the Raw checkpoint and run on Turbo "
            "(training on the distilled Turbo is a known mistake)")


def turbo_preset_for(preset: str) -> str:
    """The Turbo sibling of a Raw preset name (``krea2-raw`` -> ``krea2-turbo``)."""
    return preset.replace("raw", "turbo") if "raw" in preset else preset


def require_bitsandbytes(file: str | None = None):
    """The bitsandbytes module, or a usage error (exit 2) naming ``optimizer.name``."""
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except Exception:
        raise UsageError("optimizer.name = \"adamw8bit\" needs the bitsandbytes package, which is not installed "
                         "(or does not load here)", file=file, key="optimizer.name",
                         hint="pip install 'krea2kit[train]' (bitsandbytes, CUDA), or use name = \"adamw\"") from None
    return bnb


def make_optimizer(recipe: TrainRecipe, params: list[torch.nn.Parameter], *, file: str | None = None):
    o = recipe.optimizer
    if o.name == "adamw8bit":
        bnb = require_bitsandbytes(file)
        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def fingerprint(recipe: TrainRecipe, dataset_hash: str) -> str:
    """What a checkpoint must share with the run resuming it: everything that changes the
    training trajectory (not ``steps``, the sample settings, the output file or the
    checkpoint interval; a cosine schedule does depend on ``steps``: that is the user's call)."""
    return hashlib.sha256(json.dumps(trajectory_settings(recipe, dataset_hash), sort_keys=True).encode()).hexdigest()


def trajectory_settings(recipe: TrainRecipe, dataset_hash: str) -> dict[str, Any]:
    """The settings :func:`fingerprint` hashes, flattened to dotted keys (``optimizer.lr``); a
    checkpoint keeps them so a refused resume can name what changed."""
    data = recipe.model_dump(mode="json", by_alias=True)
    for key in ("steps", "samples", "output", "checkpoint_every", "description", "extends", "name"):
        data.pop(key, None)
    data["dataset_hash"] = dataset_hash
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", data)
    return flat


def changed_settings(before: dict[str, Any], now: dict[str, Any], most: int = 4) -> str:
    """``optimizer.lr 0.002 -> 1.0, ...`` for the keys whose values differ."""
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    shown = [f"{k} {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in keys[:most]]
    return ", ".join(shown) + (f" and {len(keys) - most} more" if len(keys) > most else "")


@dataclass
class TrainResult:
    path: Path
    steps: int
    start_step: int
    last_loss: float | None
    seconds: float
    steps_per_s: float | None
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    slider_recipe: Path | None = None
    samples: list[Path] = field(default_factory=list)


class Trainer:
    """One training run of a validated :class:`TrainRecipe`.

    ``session``: a :class:`krea2kit.api.Session` whose loaded parts are reused.
    ``recipe_file``: the recipe's path (errors name it; relative dataset paths start in its
    folder). ``recipe_data``: the merged recipe as loaded (written into the adapter's metadata).
    ``settings``: the user settings (weights locations, cache folder).
    """

    def __init__(self, recipe: TrainRecipe, *, recipe_file: str | None = None, recipe_data: dict | None = None,
                 name: str | None = None, settings=None, events: Events | None = None, host=None, session=None):
        from krea2kit.settings import get_settings

        self.recipe = recipe
        self.file = recipe_file
        self.recipe_data = recipe_data
        self.settings = settings or get_settings()
        self.events = events or _no_events
        self.host = host
        self.name = recipe.name or name or (Path(recipe_file).stem if recipe_file else "adapter")
        self.output = Path(recipe.output.path or f"{self.name}.safetensors").expanduser()
        self.work_dir = Path(recipe.output.work_dir).expanduser() if recipe.output.work_dir else \
            self.output.with_name(self.output.name + ".train")
        # Like weights and LoRA paths in run recipes, a relative dataset path starts in the
        # folder krea2kit runs in (only ``extends`` is relative to the recipe file).
        self.base_dir = Path.cwd()
        self._loaded = False
        # A krea2kit.api.Session keeps loaded parts: trainers sharing one reuse the base model
        # (each attaches its adapters to it and removes them in close()).
        self._session = session
        if session is not None:
            self.host = session.host
            self.settings = session.settings

    # -- set-up -------------------------------------------------------------------
    def _check_output(self) -> None:
        if self.output.exists() and not self.recipe.output.overwrite:
            raise UsageError(f"the adapter file {self.output} exists", file=self.file, key="output.path",
                             hint="set output.overwrite = true (or --set output.overwrite=true), or choose another path")

    def _run_plan(self, preset: str, weights, key: str):
        """A run plan for ``preset`` (loads nothing): the same part lookup ``krea2kit run`` does."""
        from krea2kit.api import Session
        from krea2kit.recipe import SCHEMA_ID
        from krea2kit.recipe.loader import LoadedRecipe

        b = self.recipe.base
        model: dict[str, Any] = {"preset": preset, "device": b.device, "dtype": b.dtype, "offload": "none"}
        w = {k: (v if isinstance(v, str) else v.model_dump(exclude_none=True))
             for k, v in weights.model_dump(exclude_none=True).items()} if weights is not None else {}
        if w:
            model["weights"] = w
        if key == "base":
            model["weights_dtype"] = b.weights_dtype
        data = {"schema": SCHEMA_ID, "prompt": "x", "model": model}
        provenance = {f"model.{k}": self.file or "<recipe>" for k in model}
        loaded = LoadedRecipe(data, provenance, self.file or "<recipe>", self.name)
        if self._session is None:
            self._session = Session(settings=self.settings, host=self.host)
        try:
            return self._session.plan(loaded)
        except RecipeError as exc:  # name the training recipe's key, not the run recipe's
            if exc.key and exc.key.startswith("model."):
                exc.key = key + exc.key[len("model"):] if key == "base" else f"samples.{exc.key[len('model.'):]}"
            raise

    def load(self) -> None:
        """Scan the dataset, load the parts, encode and cache the data, attach the adapters."""
        from krea2kit.pipeline import pick_device, pick_dtype
        from krea2kit.train.adapters import AdapterConfig, AdapterSet

        r = self.recipe
        self.events("stage", stage="load")
        registry = self._registry()
        registry.get("model", r.base.preset, key="base.preset", file=self.file)
        note = turbo_base_warning(r.base.preset)
        if note:
            self.events("warning", message=note)
        self.plan = self._run_plan(r.base.preset, r.base.weights, "base")
        # The dataset is scanned before any weights load, so a missing folder or an empty dataset
        # is a recipe error at once. Sides are multiples of the VAE factor x the patch size; the
        # VAE descriptor declares its factor, the patch is Krea 2's (checked again once loaded).
        scan = None
        if r.dataset is not None:
            from krea2kit.sampling import PATCH

            factor = getattr(getattr(self.plan.parts["vae"], "contract", None), "factor", None)
            scan = self._scan(int(factor) * PATCH if factor else 16)
        self.device = pick_device(r.base.device if r.base.device != "auto" else (self.settings.device or "auto"))
        self.dtype_name = pick_dtype(r.base.dtype if r.base.dtype != "auto" else (self.settings.dtype or "auto"),
                                     self.device)
        from krea2kit.train.memory_plan import plan_for_recipe

        plan_for_recipe(r, session=self._session, file=self.file)  # adapter.targets: before any weights load
        pipe = self._session.pipeline
        self.text_encoder = pipe.part(self.plan, "text_encoder", device=self.device, dtype=self.dtype_name,
                                      events=self.events)
        self.dit_part = pipe.part(self.plan, "dit", device=self.device, dtype=self.dtype_name, events=self.events)
        self.dit = self.dit_part.module
        self.dit.requires_grad_(False).eval()
        self.identities = dict(pipe.identities)
        from krea2kit.contracts import size_multiple

        vae = pipe.part(self.plan, "vae", device=self.device, dtype=self.dtype_name, events=self.events)
        self.multiple = size_multiple(vae, self.dit_part)
        self.latent_contract = vae.contract
        if r.mode == "slider":
            from krea2kit.train.slider import SliderObjective

            self.objective = SliderObjective(r, self.dit, self.text_encoder, channels=int(vae.contract.channels),
                                             factor=int(vae.contract.factor), multiple=self.multiple)
            self.dataset_hash = self.objective.prompt_hash()
            self.samples_data = None
        else:
            if scan.resolution and self.multiple != self._scanned_multiple:
                scan = self._scan(self.multiple)
            self._load_dataset(vae, scan)
        # The VAE is not needed while training (latents are cached); samples load their own.
        del vae
        pipe.release("vae")
        self.adapters = AdapterSet(self.dit, AdapterConfig(kind=r.adapter.kind, rank=r.adapter.rank, alpha=r.alpha,
                                                           targets=tuple(r.adapter.targets), factor=r.adapter.factor),
                                   seed=ckpt.step_seed(r.seed, 0, 7))
        self.params = [p for p in self.adapters.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(r, self.params, file=self.file)
        self.undo_checkpointing = enable_gradient_checkpointing(self.dit) if r.gradient_checkpointing else None
        self.fingerprint = fingerprint(r, self.dataset_hash)
        self._loaded = True

    def _registry(self):
        if self.host is None:
            from krea2kit.plugins import get_host

            self.host = get_host()
        return self.host.registry

    def _scan(self, multiple: int):
        from krea2kit.train.dataset import scan_dataset

        scan = scan_dataset(self.recipe.dataset, base_dir=self.base_dir, multiple=multiple, recipe_file=self.file)
        self._scanned_multiple = multiple
        self.events("dataset", lines=scan.report(), images=len(scan.unique), skipped=len(scan.skipped))
        return scan

    def _load_dataset(self, vae, scan) -> None:
        from krea2kit.train.cache import empty_prompt, encode_dataset
        from krea2kit.train.dataset import dataset_hash

        r = self.recipe
        self.scan = scan
        cache_root = self.settings.cache_root() / "train"
        self.samples_data = encode_dataset(scan, vae=vae, text_encoder=self.text_encoder, cache_dir=cache_root,
                                           device="cpu", dtype=torch.float32, events=self.events)
        self.empty = empty_prompt(self.text_encoder, device="cpu", dtype=torch.float32)
        self.dataset_hash = dataset_hash(scan)
        self.order = DataOrder([s.bucket for s in self.samples_data], r.batch_size, r.seed)

    # -- one step -----------------------------------------------------------------
    def _autocast(self):
        mp = self.recipe.mixed_precision
        if mp == "no":
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def loss(self, step: int) -> torch.Tensor:
        """The flow-matching loss of step ``step`` with gradients (LoRA mode)."""
        from krea2kit.train.cache import collate
        from krea2kit.train.objective import caption_dropout, flow_matching_loss, sample_timesteps, shift_mu

        r = self.recipe
        gen = ckpt.step_generator(r.seed, step, STREAM_STEP)
        batch = [self.samples_data[i] for i in self.order.batch(step)]
        drop = caption_dropout(gen, len(batch), r.caption_dropout)
        x0, txt, mask = collate(batch, drop=drop, empty=self.empty)
        width, height = batch[0].bucket
        t = sample_timesteps(gen, len(batch), shift_mu(r.timesteps.shift, width, height, self.multiple))
        noise = torch.randn(x0.shape, generator=gen)
        dev = self.dit.device
        with self._autocast():
            return flow_matching_loss(self.dit, x0.to(dev), txt.to(dev), mask.to(dev), t=t.to(dev),
                                      noise=noise.to(dev))

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer update for step ``step`` (0-based); returns (loss, gradient norm).
        A non-finite loss or gradient stops the run before the update (:class:`TrainingError`)."""
        r = self.recipe
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(r, step)
        self.optimizer.zero_grad(set_to_none=True)
        if r.mode == "slider":
            gen = ckpt.step_generator(r.seed, step, STREAM_STEP)
            with self._autocast():
                value = self.objective.backward(step, gen, self.adapters)
        else:
            loss = self.loss(step)
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
        if not math.isfinite(value):
            self._stop_nonfinite(step, f"loss ({value})")
        mx = r.optimizer.max_grad_norm
        grads = [p.grad for p in self.params if p.grad is not None]
        if mx > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, mx))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        if not math.isfinite(norm):
            self._stop_nonfinite(step, f"gradient norm ({norm})")
        self.optimizer.step()
        return value, norm

    def _stop_nonfinite(self, step: int, what: str) -> None:
        last = ckpt.list_checkpoints(self.work_dir)
        where = f"the last good checkpoint is {last[-1]} (step {ckpt.checkpoint_step(last[-1])})" if last else \
            "no checkpoint was written yet"
        raise TrainingError(
            f"training stopped at step {step + 1}: the {what} is not finite (NaN or infinity); {where}, "
            "and nothing after it was saved",
            file=self.file, key="optimizer.lr",
            hint="lower optimizer.lr, keep optimizer.max_grad_norm on, or train in float32 "
                 "(base.dtype = \"float32\", mixed_precision = \"no\"); then resume with --resume")

    # -- checkpoints, samples, export -------------------------------------------
    def _state(self, step: int, losses: list[float]) -> dict:
        pos = self.order.position(step) if self.recipe.mode != "slider" else (0, step)
        return {"fingerprint": self.fingerprint, "settings": trajectory_settings(self.recipe, self.dataset_hash),
                "seed": self.recipe.seed, "name": self.name,
                "data_position": {"epoch": pos[0], "batch": pos[1]},
                "losses": losses[-1000:],
                "adapter": {"kind": self.recipe.adapter.kind, "rank": self.recipe.adapter.rank,
                            "alpha": self.recipe.alpha}}

    def save_checkpoint(self, step: int, losses: list[float]) -> Path:
        path = ckpt.save_checkpoint(self.work_dir, step, adapter=self.adapters.tensors(), optimizer=self.optimizer,
                                    state=self._state(step, losses))
        self.events("checkpoint", path=path, step=step)
        return path

    def resume(self) -> tuple[int, list[float]]:
        found = ckpt.list_checkpoints(self.work_dir)
        if not found:
            self.events("warning", message=f"--resume: no checkpoint in {self.work_dir}; starting at step 0")
            return 0, []
        c = ckpt.load_checkpoint(found[-1], self.optimizer)
        if c.state.get("fingerprint") != self.fingerprint:
            before = c.state.get("settings")
            what = changed_settings(before, trajectory_settings(self.recipe, self.dataset_hash)) \
                if isinstance(before, dict) else ""
            raise UsageError(f"the checkpoint {c.path} was made by a different recipe or dataset"
                             + (f": {what}" if what else ""), file=self.file,
                             hint="resume with the recipe and data that made it (only steps, samples, output and "
                                  f"checkpoint_every may change), or remove {self.work_dir} to start over")
        try:
            self.adapters.load_tensors(c.adapter)
        except ValueError as exc:
            raise UsageError(f"the checkpoint {c.path} does not fit this adapter: {exc}", file=self.file) from None
        self.events("resumed", path=c.path, step=c.step)
        return c.step, list(c.state.get("losses", []))

    def render_samples(self, step: int) -> list[Path]:
        """The ``[samples]`` prompts on Turbo (and Raw if asked) with the adapter as it is now,
        plus a contact sheet (:func:`krea2kit.train.samples.render_trainer_samples`)."""
        if not self.recipe.samples.prompts:
            return []
        from krea2kit.train.samples import render_trainer_samples

        paths = render_trainer_samples(self, step)
        for p in paths:
            self.events("samples", path=p, step=step)
        return paths

    def metadata(self, steps: int) -> dict:
        r = self.recipe
        meta = {
            "base_model": r.base.preset, "base_weights_hash": self.identities.get("dit", {}).get("identity"),
            "adapter": r.adapter.kind, "rank": r.adapter.rank, "alpha": r.alpha, "targets": list(r.adapter.targets),
            "trigger": r.trigger or (r.dataset.trigger if r.dataset is not None else None), "steps": steps,
            "dataset_hash": self.dataset_hash, "name": self.name, "lr": r.optimizer.lr, "seed": r.seed,
            "recipe": (self.recipe_data if self.recipe_data is not None
                       else r.model_dump(mode="json", by_alias=True, exclude_none=True)),
        }
        if r.mode == "slider":
            meta["slider"] = self.objective.slider_metadata(self.name)
        return meta

    def export(self, steps: int) -> Path:
        from krea2kit.train.export import save_adapter

        dtype = getattr(torch, self.recipe.output.dtype)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        return save_adapter(self.adapters.lora_file(name=self.name), self.output, format=self.recipe.output.format,
                            metadata=self.metadata(steps), dtype=dtype, overwrite=self.recipe.output.overwrite,
                            local_paths=self.settings.metadata.local_paths)

    # -- the run ------------------------------------------------------------------
    def run(self, *, resume: bool = False, steps: int | None = None) -> TrainResult:
        r = self.recipe
        total = int(steps if steps is not None else r.steps)
        self._check_output()
        ckpt.remove_stale_temps(self.work_dir)
        existing = ckpt.list_checkpoints(self.work_dir)
        if existing and not resume:
            raise UsageError(f"{self.work_dir} holds checkpoints of an earlier run (last: step "
                             f"{ckpt.checkpoint_step(existing[-1])})", file=self.file, key="output.work_dir",
                             hint="pass --resume to continue it, or remove that folder to start over")
        if r.optimizer.name == "adamw8bit":
            require_bitsandbytes(self.file)  # before any weights load
        if not self._loaded:
            self.load()
        start, losses = self.resume() if resume else (0, [])
        if start > total:
            raise UsageError(f"the last checkpoint is at step {start}, beyond the {total} steps asked for",
                             file=self.file, key="steps", hint=f"ask for at least {start} steps (--steps {start})")
        every = r.checkpoint_every
        sample_every = r.samples.every or every
        self.events("train_start", start=start, total=total, params=self.adapters.num_params(),
                    modules=len(self.adapters.names), work_dir=self.work_dir, device=self.device)
        t0 = time.perf_counter()
        last_ckpt = existing[-1] if existing and resume else None
        sample_paths: list[Path] = []
        step = start
        window: list[float] = []
        while step < total:
            value, _ = self.train_step(step)
            step += 1
            losses.append(value)
            window.append(value)
            elapsed = time.perf_counter() - t0
            rate = (step - start) / elapsed if elapsed > 0 else None
            self.events("train_step", step=step, total=total, loss=value, lr=lr_at(r, step - 1),
                        steps_per_s=rate, eta_s=(total - step) / rate if rate else None)
            if step % every == 0 or step == total:
                last_ckpt = self.save_checkpoint(step, losses)
            if r.samples.prompts and (step % sample_every == 0 or step == total):
                sample_paths.extend(self.render_samples(step))
        seconds = time.perf_counter() - t0
        path = self.export(total)
        slider_recipe = None
        if r.mode == "slider":
            slider_recipe = self.objective.write_slider_recipe(
                self.name, path, r, turbo_preset=r.samples.turbo or turbo_preset_for(r.base.preset),
                overwrite=r.output.overwrite)
        rate = (total - start) / seconds if seconds > 0 and total > start else None
        return TrainResult(path=path, steps=total, start_step=start, last_loss=losses[-1] if losses else None,
                           seconds=seconds, steps_per_s=rate, checkpoint=last_ckpt, losses=losses,
                           slider_recipe=slider_recipe, samples=sample_paths)

    def close(self) -> None:
        if getattr(self, "adapters", None) is not None:
            self.adapters.detach()
        if getattr(self, "undo_checkpointing", None) is not None:
            self.undo_checkpointing()
