"""The generation pipeline: the only place where parts meet.

    plan -> prompt filters -> text encode (all prompts first, cache) -> per image:
    noise(seed + i) -> sampler(denoiser with adapters) -> VAE decode -> pixels
    -> image filters -> writer (atomic, metadata) -> Record

Parts are resolved by name from the plugin registry and loaded once per
:class:`Pipeline` (one per process in the CLI), then reused for every image.
Progress and warnings leave through an ``events`` callback; the pipeline never prints.

Every part is loaded as ``load(options, context)`` and satisfies the protocol of its kind
in :mod:`krea2kit.contracts` (the one reference; CONTRIBUTING.md is checked against it).
The pipeline asks the parts for the numbers it needs (latent channels and factor from the
VAE's contract, patch size from the transformer) instead of assuming Krea 2's.
"""

from __future__ import annotations

import gc
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from krea2kit.contracts import LoadContext, missing_members, protocol_for, size_multiple
from krea2kit.errors import PluginError, UsageError
from krea2kit.locate import locate_weights
from krea2kit.memory import text_encoder_released
from krea2kit.recipe.plan import Job, Plan
from krea2kit.settings import Settings

Events = Callable[..., None]


def _no_events(event: str, **data: Any) -> None:
    pass


@dataclass
class Record:
    """What happened to one image; ``--json`` prints one of these per line."""

    index: int
    status: str  # "ok" | "blocked"
    path: str | None
    prompt: str | None
    negative: str | None
    seed: int
    width: int
    height: int
    model: str
    sampler: str
    steps: int
    guidance: float
    guidance_convention: str
    mu: float | None  # None only on a blocked image of a resolution-aware run (never sampled)
    run_id: str
    sha256: str | None = None
    variation_seed: int | None = None  # [variation]: the second seed and how far toward its noise
    variation_strength: float | None = None
    blocked_by: list[str] = field(default_factory=list)
    verdicts: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("model.device = cuda, but this machine has no usable CUDA device",
                             key="model.device", hint="use device = \"auto\" or \"cpu\"")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UsageError("model.device = mps, but MPS is not available", key="model.device")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _weights_dtype(plan: Plan, role: str) -> str:
    """The storage a weights part is asked for: model.weights_dtype for the transformer,
    model.text_encoder_weights_dtype for the text encoder, "auto" (as stored) for the rest."""
    model = plan.recipe.model
    return {"dit": model.weights_dtype, "text_encoder": model.text_encoder_weights_dtype}.get(role, "auto")


def pick_dtype(requested: str, device: str) -> str:
    """Defaults per device: bf16 on CUDA, fp16 on MPS, fp32 on CPU (bf16 matmuls are slow there)."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16"
    if device == "mps":
        return "float16"
    return "float32"


class Pipeline:
    """Loads parts on first use and keeps them for the life of the object."""

    def __init__(self, settings: Settings, *, registry=None) -> None:
        self.settings = settings
        self.registry = registry
        self._parts: dict[tuple, Any] = {}
        self.identities: dict[str, dict[str, Any]] = {}  # role -> what was loaded (for metadata)

    # -- parts -------------------------------------------------------------
    def part(self, plan: Plan, role: str, *, device: str, dtype: str, events: Events) -> Any:
        """The loaded model part of ``role`` ("dit", "text_encoder", "vae"), loaded once per
        distinct load context and checked against its protocol."""
        descriptor = plan.parts[role]
        location, how = locate_weights(plan.model, role, plan.weights.get(role), self.settings)
        context = LoadContext(
            role=role, name=descriptor.name, location=str(location), config=plan.model.part_config(role),
            device=device, dtype=dtype, layout=plan.recipe.model.layout or "official",
            vae_tile_threshold=plan.recipe.model.vae_tile_threshold,
            weights_dtype=_weights_dtype(plan, role),
            offload=(plan.recipe.model.offload or "none") if role == "dit" else "none", settings=self.settings,
            plugin_options=plan.plugin_options.get(descriptor.plugin),
        )
        key = (descriptor.plugin, descriptor.name, context)
        if key not in self._parts:
            events("load", role=role, name=descriptor.name, location=location, found_by=how)
            start = time.perf_counter()
            self._parts[key] = require_protocol(descriptor, descriptor.load_part(None, context))
            events("loaded", role=role, name=descriptor.name, seconds=time.perf_counter() - start)
        self.identities[role] = {
            "name": descriptor.name, "plugin": descriptor.plugin, "weights": location,
            "identity": self._parts[key].identity,  # every model part declares one (contracts)
        }
        return self._parts[key]

    def small_part(self, plan: Plan, role: str, options: Any) -> Any:
        """A part without weights (sampler, writer), loaded through the same convention."""
        descriptor = plan.parts[role]
        context = LoadContext(role=role, name=descriptor.name, settings=self.settings,
                              plugin_options=plan.plugin_options.get(descriptor.plugin))
        return require_protocol(descriptor, descriptor.load_part(options, context))

    _ROLE_NAMES = {"dit": "transformer", "vae": "VAE", "text_encoder": "text encoder"}

    def require_finite(self, plan: Plan, x: Any, role: str, what: str) -> None:
        """Stop the run when a part's output holds NaN or inf (NaN weights used to give an
        all-black image and exit 0). One reduction per tensor: cheap next to the model call."""
        import torch

        if not isinstance(x, torch.Tensor) or bool(torch.isfinite(x).all()):
            return
        from krea2kit.errors import WeightsError

        weights = self.identities.get(role, {}).get("weights")
        weights = str(weights) if weights else None
        name = self._ROLE_NAMES.get(role, role)
        hint = "check or fetch the weights again (compare the file's sha256)"
        if x.dtype == torch.float16:
            hint += '; float16 can overflow: try model.dtype = "bfloat16" or "float32"'
        if role == "dit" and plan.recipe.loras:
            hint += "; or run without the [[loras]] to rule them out"
        which = "its weights (this file)" if weights else "its weights"
        raise WeightsError(f"the {name} produced NaN or infinite values in {what}: {which} hold non-finite "
                           "values or are not the model they should be; nothing was written",
                           file=weights, key=f"model.weights.{role}", hint=hint)

    def release(self, role: str) -> None:
        for key in [k for k in self._parts if k[2].role == role]:
            del self._parts[key]
        gc.collect()

    # -- the run -----------------------------------------------------------
    def run(self, plan: Plan, *, events: Events | None = None, run_id: str | None = None) -> Iterator[Record]:
        """Generate every job of ``plan``, yielding a :class:`Record` as each image is done."""
        import torch

        from krea2kit.runtime.filters import FilterSet
        from krea2kit.runtime.outputs import OutputPlanner

        events = events or _no_events
        run_id = run_id or uuid.uuid4().hex[:12]
        recipe = plan.recipe
        device = pick_device(recipe.model.device if recipe.model.device != "auto" else (self.settings.device or "auto"))
        dtype_name = pick_dtype(recipe.model.dtype if recipe.model.dtype != "auto" else (self.settings.dtype or "auto"), device)
        dtype = getattr(torch, dtype_name)
        check_load_signatures(plan)  # a part that cannot be loaded is named before any weights load
        if not self._parts:  # parts already loaded hold device memory the estimate would count twice
            from krea2kit.memory import preflight

            preflight(plan, self.settings, device=device, dtype=dtype_name,
                      warn=lambda message: events("warning", message=message))
        filters = FilterSet(plan, self.settings, run_id=run_id, events=events)
        outputs = OutputPlanner(plan)

        # 1. Prompt filters on everything that reaches the text encoder.
        blocked_prompts = filters.check_prompts(plan.jobs)

        # 2. Encode every prompt (and negative) first; the encoder can then be freed.
        use_cfg = plan.guidance > 0
        texts: list[str] = []
        for job in plan.jobs:
            if job.index in blocked_prompts:
                continue
            texts.append(job.prompt)
            if use_cfg:
                texts.append(job.negative)
        unique = list(dict.fromkeys(texts))
        conds: dict[str, Any] = {}
        if unique:
            encoder = self.part(plan, "text_encoder", device=device, dtype=dtype_name, events=events)
            start = time.perf_counter()
            events("stage", stage="encode", total=len(unique))
            hidden, mask = encoder.encode(unique)
            self.require_finite(plan, hidden, "text_encoder", "the prompt encodings")
            for note in encoder.take_warnings():
                events("warning", message=note)
            for i, text in enumerate(unique):
                conds[text] = (hidden[i : i + 1], mask[i : i + 1])
            encode_s = time.perf_counter() - start
            if text_encoder_released(plan):  # model.offload, else the preset's choice
                del encoder
                self.release("text_encoder")
        else:
            encode_s = 0.0

        dit = self.part(plan, "dit", device=device, dtype=dtype_name, events=events) if unique else None
        if dit is not None:
            check_text_fits(plan, dit, conds)
        vae = self.part(plan, "vae", device=device, dtype=dtype_name, events=events) if unique else None
        if dit is not None and vae is not None:
            check_latents_fit(plan, dit, vae)
        sampler_model = plan.parts["sampler"].options_model()
        sampler_fn = self.small_part(plan, "sampler",
                                     sampler_model.model_validate(plan.sampler_options) if sampler_model else None)
        writer = self.small_part(plan, "writer", None)
        adapters = None
        if dit is not None and recipe.loras:
            from krea2kit.runtime.loras import attach_recipe_loras

            adapters = attach_recipe_loras(plan, dit, events=events)

        try:
            for job in plan.jobs:
                if job.index in blocked_prompts:
                    yield self._blocked_record(plan, job, run_id, blocked_prompts[job.index])
                    continue
                yield self._generate(plan, job, run_id, dit, vae, sampler_fn, writer, conds, adapters,
                                     filters, outputs, device, dtype, encode_s / max(len(plan.jobs), 1), events)
        finally:
            if adapters is not None:
                adapters.detach()

    def _base_record(self, plan: Plan, job: Job, run_id: str, mu: float | None) -> Record:
        include = plan.recipe.output.include_prompt
        return Record(
            index=job.index, status="ok", path=None,
            prompt=job.prompt if include else None, negative=job.negative if include else None,
            seed=job.seed, width=job.width, height=job.height, model=plan.model.name,
            sampler=plan.recipe.sampler.name or "", steps=plan.steps, guidance=plan.recipe.sampler.guidance or 0.0,
            guidance_convention=plan.recipe.sampler.convention, mu=mu, run_id=run_id,
            variation_seed=job.variation_seed,
            variation_strength=job.variation_strength if job.variation_seed is not None else None,
        )

    def _blocked_record(self, plan: Plan, job: Job, run_id: str, decision: Any) -> Record:
        # never sampled: the recipe's mu (None when resolution-aware, as no parts may be loaded)
        record = self._base_record(plan, job, run_id, plan.mu)
        record.status = "blocked"
        record.blocked_by = [v.filter for v in decision.blocking]
        record.verdicts = [v.to_dict() for v in decision.verdicts]
        return record

    def _generate(self, plan, job, run_id, dit, vae, sampler_fn, writer, conds, adapters, filters, outputs,
                  device, dtype, encode_share, events) -> Record:
        import torch

        from krea2kit import sampling

        timings: dict[str, float] = {"encode": encode_share}
        multiple = size_multiple(vae, dit)
        width, height, padded = sampling.aligned_size(job.width, job.height, multiple)
        if padded:
            events("warning", message=f"image {job.index}: {job.width}x{job.height} is not a multiple of {multiple}; "
                                      f"generating {width}x{height} and cropping back")
        mu = job_mu(plan, job, multiple)
        record = self._base_record(plan, job, run_id, mu)
        # [init]: the first `skip` steps of the schedule are skipped (strength; see sampling)
        skip = sampling.skipped_steps(plan.steps, plan.recipe.init.strength) if plan.recipe.init else 0
        events("job_start", job=job, total=len(plan.jobs), steps=plan.steps - skip)

        start = time.perf_counter()
        contract = vae.contract
        noise = sampling.varied_noise(job.seed, job.variation_seed, job.variation_strength, height, width,
                                      channels=contract.channels, factor=contract.factor, device=device, dtype=dtype)
        cond = conds[job.prompt]
        uncond = conds[job.negative] if plan.guidance > 0 else None
        denoise = dit.make_denoiser(cond, uncond, guidance=plan.guidance,
                                    latent_size=(height // contract.factor, width // contract.factor))
        sigmas = sampling.flow_sigmas(plan.steps, mu)
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        # [init]: start `skip` steps into the schedule from the encoded picture (same noise per seed)
        init = self._init_latents(plan, job, vae, (width, height), device, dtype) if plan.recipe.init else None
        sigmas = sigmas[skip:]
        x_start = noise if init is None else sampling.noised(init[0], noise, float(sigmas[0]))

        def on_step(step: int, total: int, sigma: float, x: Any) -> None:
            if init is not None and init[1] is not None:  # inpainting: keep the unmasked part on the init's path
                x.copy_(sampling.inpaint_blend(x, init[0], noise, init[1], sigma))
            # the sampler calls back after step `step`; the next model call is step + 1 (of the full schedule)
            if adapters is not None and skip + step + 1 < plan.steps:
                adapters.set_step(skip + step + 1, plan.steps)
            events("step", job=job, step=step + 1, total=total)

        if adapters is not None:
            adapters.set_step(skip, plan.steps)
        with torch.inference_mode():
            if len(sigmas) < 2:  # strength 0: no step left, the picture itself
                latents = x_start
            else:
                latents = sampler_fn(denoise, x_start, sigmas, generator=generator, callback=on_step,
                                     **plan.sampler_options)
            if init is not None and init[1] is not None:  # a sampler may call back with a copy: blend once more
                latents = sampling.inpaint_blend(latents, init[0], noise, init[1], 0.0)
            self.require_finite(plan, latents, "dit", f"the latent of image {job.index}")
            timings["denoise"] = time.perf_counter() - start
            start = time.perf_counter()
            decoded = vae.decode(latents)
            self.require_finite(plan, decoded, "vae", f"the decoded pixels of image {job.index}")
            if init is not None and init[1] is not None:
                # The decoder mixes latents across the picture (its attention and wide
                # convolutions), so the kept region is pasted back from the source pixels
                # through the same feathered mask; the latent blend made the seam fit.
                decoded = init[3] * decoded + (1.0 - init[3]) * init[2]
        image = sampling.to_pixels(decoded, size=(job.width, job.height))[0]
        timings["decode"] = time.perf_counter() - start

        start = time.perf_counter()
        decision = filters.check_image(job, image)
        timings["filter"] = time.perf_counter() - start
        record.verdicts = [v.to_dict() for v in decision.verdicts]
        if decision.blocked:
            record.status = "blocked"
            record.blocked_by = [v.filter for v in decision.blocking]
            events("job_end", record=record)
            return record

        start = time.perf_counter()
        info = outputs.info(job, record, parts=self.identities, filters=filters, image_decision=decision,
                            settings=self.settings)
        written = outputs.write(job, writer, image, info)  # claims a free name atomically
        timings["write"] = time.perf_counter() - start
        record.path = str(written)
        record.sha256 = hashlib.sha256(Path(written).read_bytes()).hexdigest()
        record.timings = {k: round(v, 4) for k, v in timings.items()}
        events("job_end", record=record)
        return record

    def _init_latents(self, plan: Plan, job: Job, vae: Any, size: tuple[int, int], device: str,
                      dtype: Any) -> tuple[Any, Any, Any, Any]:
        """The ``[init]`` picture framed to the job (cover, center-crop; see
        :mod:`krea2kit.recipe.init_image`) and encoded by the run's VAE; with a mask, also
        the mask (feathered) on the latent grid, the picture's pixels and the pixel mask
        (the last three None without one)."""
        import torch

        from krea2kit import sampling
        from krea2kit.recipe.init_image import feathered, framed, open_checked

        init = plan.recipe.init
        width, height = size
        picture = framed(open_checked(init.image, "init.image"), job.width, job.height)
        source = sampling.pixels_to_tensor(picture, width, height, device=device, dtype=dtype)
        with torch.inference_mode():
            x0 = vae.encode(source)
        self.require_finite(plan, x0, "vae", f"the encoded init image of image {job.index}")
        if init.mask is None:
            return x0, None, None, None
        pixels = feathered(framed(open_checked(init.mask, "init.mask"), job.width, job.height), init.mask_blur)
        pixel_mask = sampling.pixels_to_tensor(pixels, width, height, device=device, dtype=torch.float32)
        mask = sampling.latent_mask(pixel_mask, tuple(x0.shape[-2:])).to(dtype)
        return x0, mask, source, pixel_mask.to(dtype)


def job_mu(plan: Plan, job: Job, multiple: int) -> float:
    """The shift of one image: the recipe's, or resolution-aware from its image-token count,
    one token per ``multiple`` pixels a side (the VAE's factor x the transformer's patch,
    :func:`krea2kit.contracts.size_multiple`), the size padded up to it as the official
    sampler counts."""
    if plan.mu is not None:
        return plan.mu
    from krea2kit import sampling

    return sampling.resolution_mu(sampling.image_tokens(job.width, job.height, multiple))


def check_load_signatures(plan: Plan) -> None:
    """Every part the plan uses must take ``load(options, context)``: say which does not
    before anything heavy loads (filters are checked by their fail-closed loader)."""
    from krea2kit.contracts import CONTRACT_VERSION

    for descriptor in [*plan.parts.values(), *(kind for _, kind, _ in plan.slider_parts)]:
        problem = descriptor.load_problem()
        if problem:
            raise PluginError(
                f"{descriptor.kind.replace('_', ' ')} {descriptor.name!r} from plugin {descriptor.plugin or '?'!r}: "
                f"{problem}",
                hint=f"krea2kit plugin contract {CONTRACT_VERSION}: every load is `def load(options, context)`; "
                     "see CONTRIBUTING.md 'Writing a plugin' and `krea2kit plugins --check`",
            )


def require_protocol(descriptor: Any, part: Any) -> Any:
    """``part`` as loaded, if it has what the protocol of its kind declares; else a
    :class:`PluginError` naming the plugin and what is missing (not an AttributeError later)."""
    protocol = protocol_for(descriptor.kind, getattr(descriptor, "target", "image"))
    missing = missing_members(part, protocol)
    if missing:
        raise PluginError(
            f"{descriptor.kind.replace('_', ' ')} {descriptor.name!r} from plugin {descriptor.plugin or '?'!r}: "
            f"its load() returned {type(part).__name__}, which lacks {', '.join(missing)} "
            f"({protocol.__name__} in krea2kit.contracts)",
            hint="run `krea2kit plugins --check` for the full report",
        )
    return part


def check_latents_fit(plan: Plan, dit: Any, vae: Any) -> None:
    """The VAE's latents must be what the transformer consumes (both declare it)."""
    from krea2kit.errors import WeightsError

    if int(dit.in_channels) != int(vae.contract.channels):
        raise WeightsError(
            f"the VAE gives {vae.contract.describe()}, but the transformer of {plan.model.name!r} takes "
            f"{dit.in_channels} latent channels",
            key="model.vae", hint="choose a VAE whose latent space matches the transformer (see `krea2kit plugins`)",
        )


def check_text_fits(plan: Plan, dit: Any, conds: dict[str, Any]) -> None:
    """The encoder's hidden states must have the shape the transformer's text fusion takes."""
    from krea2kit.errors import WeightsError

    expected = dit.text_shape
    if expected is None or not conds:
        return
    hidden = next(iter(conds.values()))[0]
    taps, width = hidden.shape[-2], hidden.shape[-1]
    if (taps, width) != tuple(expected):
        raise WeightsError(
            f"the text encoder gives {taps} tapped layers of width {width}, but the transformer of "
            f"{plan.model.name!r} fuses {expected[0]} layers of width {expected[1]}",
            key="model.weights.text_encoder",
            hint="use the text encoder this transformer was trained with (Krea 2: Qwen3-VL-4B-Instruct)",
        )


def plugin_versions(host) -> dict[str, str]:
    return {name: info.version for name, info in host.plugins.items()}


__all__ = ["Pipeline", "Record", "job_mu", "pick_device", "pick_dtype"]
