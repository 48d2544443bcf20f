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
    status: str  # "ok" | "blocked" | "dropped" ([diversity] keep: rendered and scored, not written)
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
    # [expander]: the prompt as written (``prompt`` is the expanded text that was encoded) and
    # how it was expanded ({backend, identity, source, ...}); None when not expanded
    original_prompt: str | None = None
    expansion: dict | None = None
    blocked_by: list[str] = field(default_factory=list)
    verdicts: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # [diversity]: the batch's scores and this image's place in them (krea2kit.diversity);
    # left out of the JSON when the run has no [diversity] table
    diversity: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data.get("diversity") is None:
            data.pop("diversity", None)
        if data.get("expansion") is None:  # [expander]: only for a prompt it expanded (or tried to)
            data.pop("expansion", None)
            data.pop("original_prompt", None)
        return data


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
        # Set by a runner that filters and writes images in stages of its own (krea2kit.jobs.work,
        # the Ray plugin): called as image_handoff(plan, job, record, image, filters) once an
        # image is decoded, instead of the image filters and the writer; what it returns is
        # yielded by run() in place of the Record.
        self.image_handoff: Callable[..., Any] | None = None

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

    def record_quant_compute(self, role: str, used: set[str]) -> None:
        """Record beside the storage layout in the images' metadata the compute path(s) the
        quantized layers of ``role`` took in this run (model.quant_compute and the device
        decide: krea2kit.models.quant.linear); the part's identity names the load-time default."""
        import re

        from krea2kit.models.quant.linear import describe_paths

        entry = self.identities.get(role)
        if entry is None or not used:
            return
        entry["compute"] = describe_paths(used)
        if isinstance(entry.get("identity"), str):
            entry["identity"] = re.sub(r"\bcompute=\S+", f"compute={entry['compute']}", entry["identity"])

    def load_expander(self, plan: Plan, *, device: str, dtype: str) -> Any:
        """The recipe's ``[expander] backend`` (:class:`krea2kit.contracts.PromptExpander`). A
        backend that ``needs`` weights gets the run's text encoder location (the user config's
        ``expander.weights`` overrides it); an endpoint comes from ``context.settings`` only."""
        from krea2kit.expander.jobs import section

        registry = self.registry
        if registry is None:
            from krea2kit.plugins import get_host

            registry = get_host().registry
        descriptor = registry.get("prompt_expander", section(plan.recipe).backend, key="expander.backend")
        location = ""
        if getattr(descriptor, "needs", "") == "weights" and not self.settings.expander.weights:
            location, _ = locate_weights(plan.model, "text_encoder", plan.weights.get("text_encoder"), self.settings)
        context = LoadContext(role="prompt_expander", name=descriptor.name, location=str(location), device=device,
                              dtype=dtype, settings=self.settings,
                              plugin_options=plan.plugin_options.get(descriptor.plugin))
        return require_protocol(descriptor, descriptor.load_part(None, context))

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
        diversity_part = self._diversity_part(plan)  # [diversity]: an unknown embedder is exit 2, before loading
        from krea2kit.models.quant.linear import quant_compute

        if recipe.model.quant_compute == "scaled-mm" and device.split(":")[0] not in ("cpu", "cuda"):
            from krea2kit.errors import RecipeError

            raise RecipeError(f'"scaled-mm" needs a CUDA GPU or the CPU; {device} has no fp8/int8 matmul',
                              file=str(plan.loaded.path) if plan.loaded.path else None,
                              key="model.quant_compute", hint='use "auto" or "dequantize"')
        if not self._parts:  # parts already loaded hold device memory the estimate would count twice
            from krea2kit.memory import preflight

            preflight(plan, self.settings, device=device, dtype=dtype_name,
                      warn=lambda message: events("warning", message=message))
        embedder = None
        if diversity_part is not None and self.image_handoff is None:
            # before the model: an embedder without its weights stops the run before minutes of loading
            embedder = self._embedder(plan, *diversity_part, device=device, events=events)
        filters = FilterSet(plan, self.settings, run_id=run_id, events=events)
        outputs = OutputPlanner(plan)

        # 0. [expander]: prompts filtered as written, then expanded (krea2kit.expander.jobs); the
        #    expanded text is what step 1 filters and step 2 encodes.
        blocked_originals: dict[int, Any] = {}
        from krea2kit.expander.jobs import active as expander_active

        if expander_active(plan):
            from krea2kit.expander.jobs import expand_jobs

            blocked_originals = expand_jobs(
                plan, self.settings, filters, events=events,
                load_backend=lambda: self.load_expander(plan, device=device, dtype=dtype_name))

        # 1. Prompt filters on everything that reaches the text encoder.
        blocked_prompts = filters.check_prompts([j for j in plan.jobs if j.index not in blocked_originals])
        blocked_prompts.update(blocked_originals)

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
            with quant_compute(recipe.model.quant_compute) as quant_paths:  # model.quant_compute
                hidden, mask = encoder.encode(unique)
            self.record_quant_compute("text_encoder", quant_paths)
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
        diversity = None
        if diversity_part is not None and unique:
            from krea2kit.diversity import DiversityRun

            if self.image_handoff is not None:  # a runner that writes images itself selects nothing
                events("warning", message="[diversity] is not applied by this runner: every image is written")
            else:
                diversity = DiversityRun(plan, *diversity_part)
        adapters = None
        if dit is not None and recipe.loras:
            from krea2kit.runtime.loras import attach_recipe_loras

            adapters = attach_recipe_loras(plan, dit, events=events)

        try:
            for job in plan.jobs:
                if job.index in blocked_prompts:
                    yield self._blocked_record(plan, job, run_id, blocked_prompts[job.index])
                elif diversity is None:
                    yield self._generate(plan, job, run_id, dit, vae, sampler_fn, writer, conds, adapters,
                                         filters, outputs, device, dtype, encode_s / max(len(plan.jobs), 1), events)
                else:  # [diversity]: held in memory until its prompt's batch is complete
                    done = self._generate(plan, job, run_id, dit, vae, sampler_fn, writer, conds, adapters, filters,
                                          outputs, device, dtype, encode_s / max(len(plan.jobs), 1), events,
                                          defer=True)
                    if isinstance(done, Record):  # blocked by an image filter: final, never part of the batch
                        yield done
                    else:
                        diversity.add(job, *done)
                if diversity is not None and diversity.ends_batch(job):
                    yield from self._finish_batch(diversity, embedder, writer, outputs, events)
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
            **_expansion_fields(job, include),
        )

    def _blocked_record(self, plan: Plan, job: Job, run_id: str, decision: Any) -> Record:
        # never sampled: the recipe's mu (None when resolution-aware, as no parts may be loaded)
        record = self._base_record(plan, job, run_id, plan.mu)
        record.status = "blocked"
        record.blocked_by = [v.filter for v in decision.blocking]
        record.verdicts = [v.to_dict() for v in decision.verdicts]
        return record

    def _generate(self, plan, job, run_id, dit, vae, sampler_fn, writer, conds, adapters, filters, outputs,
                  device, dtype, encode_share, events, defer: bool = False) -> Record:
        """Render, filter and write one image. ``defer`` ([diversity]): instead of writing it,
        return ``(record, image, info)`` for :meth:`_finish_batch` (a blocked image's Record as usual)."""
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
        references = None
        if plan.recipe.references:  # [[references]]: their tokens ride along every model call (krea2kit.references)
            from krea2kit.references.conditioning import prepare as prepare_references

            denoise, references = prepare_references(self, plan, job, dit, vae, denoise, (width, height), device,
                                                     dtype, start_step=skip)
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
            if references is not None and skip + step + 1 < plan.steps:
                references.set_step(skip + step + 1, plan.steps)
            events("step", job=job, step=step + 1, total=total)

        if adapters is not None:
            adapters.set_step(skip, plan.steps)
        with torch.inference_mode():
            if len(sigmas) < 2:  # strength 0: no step left, the picture itself
                latents = x_start
            else:
                from krea2kit.models.quant.linear import quant_compute

                with quant_compute(plan.recipe.model.quant_compute) as quant_paths:  # model.quant_compute
                    latents = sampler_fn(denoise, x_start, sigmas, generator=generator, callback=on_step,
                                         **plan.sampler_options)
                self.record_quant_compute("dit", quant_paths)
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
        if self.image_handoff is not None:
            record.timings = {k: round(v, 4) for k, v in timings.items()}
            return self.image_handoff(plan, job, record, image, filters)

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
        if defer:
            timings["write"] = time.perf_counter() - start
            record.timings = {k: round(v, 4) for k, v in timings.items()}
            return record, image, info
        written = outputs.write(job, writer, image, info)  # claims a free name atomically
        timings["write"] = time.perf_counter() - start
        record.path = str(written)
        record.sha256 = hashlib.sha256(Path(written).read_bytes()).hexdigest()
        record.timings = {k: round(v, 4) for k, v in timings.items()}
        events("job_end", record=record)
        return record

    # -- [diversity] ---------------------------------------------------------
    def _diversity_part(self, plan: Plan) -> tuple[Any, Any] | None:
        """The ``[diversity]`` embedder's descriptor and options (``None`` without the table)."""
        if plan.recipe.diversity is None:
            return None
        from krea2kit.diversity import resolve_embedder

        registry = self.registry
        if registry is None:
            from krea2kit.plugins import get_host

            registry = get_host().registry
        return resolve_embedder(plan, registry)

    def _embedder(self, plan: Plan, descriptor: Any, options: Any, *, device: str, events: Events) -> Any:
        """The embedder part, loaded once per descriptor, options and device."""
        context = LoadContext(role="embedder", name=descriptor.name, device=device, dtype="float32",
                              settings=self.settings, plugin_options=plan.plugin_options.get(descriptor.plugin))
        key = (descriptor.plugin, descriptor.name, context, repr(options))
        if key not in self._parts:
            where = "its plugin's options" if getattr(descriptor, "needs_weights", False) else "built in, no weights"
            events("load", role="embedder", name=descriptor.name, location=where, found_by="[diversity]")
            start = time.perf_counter()
            self._parts[key] = require_protocol(descriptor, descriptor.load_part(options, context))
            events("loaded", role="embedder", name=descriptor.name, seconds=time.perf_counter() - start)
        return self._parts[key]

    def _finish_batch(self, diversity: Any, embedder: Any, writer: Any, outputs: Any,
                      events: Events) -> Iterator[Record]:
        """Embed and score a complete batch; write the kept images (scores in their metadata),
        mark the others ``dropped`` (never written); yield every record in job order."""
        from krea2kit.diversity import summary_line

        start = time.perf_counter()
        results = diversity.finish(embedder)
        if not results:
            return
        share = (time.perf_counter() - start) / len(results)
        events("diversity", message=summary_line([r[4] for r in results], [r[0] for r in results]))
        for job, record, image, info, report in results:
            record.diversity = report
            record.timings = {**record.timings, "diversity": round(share, 4)}
            if not report["selected"]:
                record.status = "dropped"
                events("job_end", record=record)
                yield record
                continue
            meta = info.metadata.krea2kit
            if isinstance(meta, dict) and "recipe" in meta:  # metadata on: the scores travel with the image
                meta["diversity"] = {k: v for k, v in report.items() if k != "selected"}
                # the image's own recipe renders this one image: batch selection does not apply to it
                if isinstance(meta["recipe"], dict):
                    meta["recipe"].pop("diversity", None)
            started = time.perf_counter()
            written = outputs.write(job, writer, image, info)  # claims a free name atomically
            record.path = str(written)
            record.sha256 = hashlib.sha256(Path(written).read_bytes()).hexdigest()
            record.timings["write"] = round(record.timings.get("write", 0.0) + time.perf_counter() - started, 4)
            events("job_end", record=record)
            yield record

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


def _expansion_fields(job: Job, include_prompt: bool) -> dict[str, Any]:
    if job.expansion is None:
        return {}
    from krea2kit.expander.jobs import record_fields

    return record_fields(job, include_prompt=include_prompt)


def plugin_versions(host) -> dict[str, str]:
    return {name: info.version for name, info in host.plugins.items()}


__all__ = ["Pipeline", "Record", "job_mu", "pick_device", "pick_dtype"]
