"""Planning: a validated recipe + the registry -> resolved settings and a list of jobs.

Everything that can be wrong with a recipe is found here, before any weights load:
unknown parts, sampler options, plugin tables, slider bindings, a VAE whose latent
space does not fit the transformer, missing prompts, unset environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from krea2kit import env_values
from krea2kit.errors import RecipeError
from krea2kit.validation import did_you_mean, validate_model
from krea2kit.recipe.loader import LoadedRecipe, ensure_schema_id, recorded_file
from krea2kit.recipe.schema import EnvRef, Recipe
from krea2kit.recipe import references as _references
from krea2kit.registry import Descriptor, ModelDescriptor, Registry
from krea2kit.settings import Settings

# The model a recipe gets when it names none: the embedded nano family (no download).
DEFAULT_MODEL = "krea2-nano-turbo"
ROLES = ("dit", "text_encoder", "vae")


@dataclass
class Job:
    """One image to make."""

    index: int  # position in the run (0-based)
    prompt_index: int  # which prompt entry it came from
    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    label: str = ""
    # [variation]: the noise is slerp(strength, noise(seed), noise(variation_seed)); None: plain
    variation_seed: int | None = None
    variation_strength: float = 0.0
    # [expander]: set by the run when this prompt was expanded (krea2kit.expander.jobs): the
    # original text, the expanded one (None: kept as written) and how; ``prompt`` then holds
    # what is encoded. None: not expanded.
    expansion: dict[str, Any] | None = None


@dataclass
class Plan:
    recipe: Recipe
    loaded: LoadedRecipe
    model: ModelDescriptor
    parts: dict[str, Descriptor]  # dit, text_encoder, vae, sampler, writer
    sampler_options: dict[str, Any]
    steps: int
    guidance: float  # always in the Krea convention (v = cond + g(cond - uncond))
    mu: float | None  # None: resolution-aware
    weights: dict[str, str | None]  # role -> location the recipe asked for (None: let the loader find it)
    jobs: list[Job]
    # (entry, kind, slider): each [[sliders]] entry built (no weights) as a contracts.Slider
    slider_parts: list[tuple[Any, Descriptor, Any]] = field(default_factory=list)
    filters: list[tuple[Descriptor, Any]] = field(default_factory=list)
    plugin_options: dict[str, Any] = field(default_factory=dict)
    plugin_versions: dict[str, str] = field(default_factory=dict)  # filled at run time, for metadata
    lora_formats: list[Descriptor] = field(default_factory=list)  # registered LoRA readers
    # [[loras]] paths given as {env = "VAR"}: the reference, by entry index. The entry itself
    # holds the resolved path (the loader reads it); what is shown or recorded is the reference.
    lora_env_refs: dict[int, EnvRef] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.loaded.name

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (what `recipe show` prints and images
        record). A path from the environment stays ``{env = "VAR"}``: its value is not shown."""
        data = self.recipe.model_dump(mode="json", by_alias=True, exclude={"extends"})
        for i, ref in self.lora_env_refs.items():
            data["loras"][i]["path"] = ref.model_dump(mode="json")
        return data


def _env(ref: Any, key: str, loaded: LoadedRecipe) -> str | None:
    if ref is None:
        return None
    if isinstance(ref, EnvRef):
        # A value from the environment is remembered so messages name $VAR instead of it;
        # the default is the recipe's own text and needs no hiding.
        value = env_values.from_env(ref.env) or ref.default
        if value is None:
            raise RecipeError(
                f"environment variable {ref.env} is not set (or empty)",
                file=loaded.file_of(key), key=key,
                hint=f"export {ref.env}=/path/to/weights, or give {{env = \"{ref.env}\", default = \"...\"}}",
            )
        return value
    return ref


def plan_recipe(loaded: LoadedRecipe, registry: Registry, settings: Settings, *,
                prompts: list[str] | None = None) -> Plan:
    """Validate ``loaded`` against the schema and the registry and expand it into jobs.

    ``prompts`` (from ``--prompt`` or stdin) replace the recipe's prompts.
    """
    ensure_schema_id(loaded)
    if prompts:
        _replace_prompts(loaded, prompts)
    _refuse_filter_switches(loaded)
    _check_image_init(loaded)
    _references.check_image_references(loaded)  # [[references]] an image names: given again, same files
    recipe: Recipe = validate_model(Recipe, loaded.data, file=loaded.path, provenance=loaded.provenance)
    if recipe.matrix is not None:  # one plan per combination: krea2kit.recipe.matrix.expand
        raise RecipeError("a [matrix] recipe is several runs, one per combination of its values",
                          file=loaded.file_of("matrix"), key="matrix",
                          hint="run it with `krea2kit run`; in Python, plan each cell of krea2kit.recipe.matrix.expand()")
    model, parts = _model_parts(recipe, loaded, registry, settings)
    parts["sampler"], sampler_options, guidance, mu = _sampler(recipe, loaded, registry, model)
    jobs = _jobs(recipe, loaded, model)
    weights = {role: _env(getattr(recipe.model.weights, role), f"model.weights.{role}", loaded) for role in ROLES}
    lora_env_refs = _resolve_lora_paths(recipe, loaded)
    _references.resolve(recipe, loaded)
    f = loaded.file_of
    parts["writer"] = registry.get("writer", recipe.output.format, key="output.format", file=f("output.format"))
    plan = Plan(recipe=recipe, loaded=loaded, model=model, parts=parts, sampler_options=sampler_options,
                steps=recipe.sampler.steps, guidance=guidance, mu=mu, weights=weights, jobs=jobs,
                lora_formats=registry.all("lora_format"), lora_env_refs=lora_env_refs)
    _check_file_names(plan)
    _check_init_files(plan)
    _check_expander(plan, registry)
    _references.check_files(recipe, loaded.file_of)
    plan.plugin_options = _plugin_tables(recipe, loaded, registry)
    plan.slider_parts = _sliders(recipe, loaded, registry, plan.plugin_options)
    plan.filters = _filters(recipe, loaded, registry, settings)
    _check_lora_files(plan)  # last: a recipe error (exit 2) is reported before a missing file (exit 4)
    return plan


def _replace_prompts(loaded: LoadedRecipe, prompts: list[str]) -> None:
    loaded.data.pop("prompts", None)
    loaded.data.pop("prompt", None)
    if len(prompts) == 1:
        loaded.data["prompt"] = prompts[0]
    else:
        loaded.data["prompts"] = [{"text": p} for p in prompts]
    loaded.provenance["prompt"] = loaded.provenance["prompts"] = "--prompt"


def _refuse_filter_switches(loaded: LoadedRecipe) -> None:
    """Say plainly why a recipe cannot turn filters off (rather than "unknown key")."""
    safety = loaded.data.get("safety")
    if not isinstance(safety, dict):
        return
    for key in ("enabled", "enable", "disable", "disabled", "off", "unfiltered", "mandatory"):
        if key in safety:
            raise RecipeError(
                "content filters cannot be switched off by a recipe (Krea 2 licence, section 4.2)",
                file=loaded.file_of(f"safety.{key}"), key=f"safety.{key}",
                hint="a deployer can, with safety.unfiltered = true in the user config (`krea2kit config`); "
                     "every image then records that it was produced unfiltered",
            )


def _model_parts(recipe: Recipe, loaded: LoadedRecipe, registry: Registry,
                 settings: Settings) -> tuple[ModelDescriptor, dict[str, Descriptor]]:
    f = loaded.file_of
    preset_name = recipe.model.preset or settings.default_model or DEFAULT_MODEL
    model: ModelDescriptor = registry.get("model", preset_name, key="model.preset", file=f("model.preset"))  # type: ignore[assignment]
    recipe.model.preset = preset_name
    parts: dict[str, Descriptor] = {}
    for role in ROLES:
        name = getattr(recipe.model, role) or getattr(model, role)
        parts[role] = registry.get(role, name, key=f"model.{role}", file=f(f"model.{role}"))
        setattr(recipe.model, role, name)
    recipe.model.layout = recipe.model.layout or model.layout
    # Only the channel count must fit the transformer: the VAE's factor sets how many pixels a
    # latent cell covers, and image sizes follow it (factor x the transformer's patch size).
    # The loaded transformer's in_channels is checked again at run time (check_latents_fit).
    contract = parts["vae"].contract  # a VAEDescriptor's declared LatentContract, or None
    if contract is not None and contract.channels != model.latent_channels:
        raise RecipeError(
            f"VAE {parts['vae'].name!r} produces {contract.describe()}, but the transformer of "
            f"{model.name!r} takes {model.latent_channels} latent channels",
            file=f("model.vae"), key="model.vae",
            hint="choose a VAE whose latent space matches the model (see `krea2kit plugins`)",
        )
    return model, parts


def part_options(loaded: LoadedRecipe, section: Any, descriptor: Descriptor, *, table: str, what: str) -> Any:
    """The part's own options in a recipe table that also has common keys (``[sampler]``,
    ``[diversity]``): the keys the table's schema does not know, validated by the part's
    options model (``None`` when it has none). An unknown key is exit 2, naming the file, the
    key and both lists."""
    f = loaded.file_of
    extra = section.extra_options()
    options_model = descriptor.options_model()
    common = list(type(section).model_fields)
    own = list(options_model.model_fields) if options_model is not None else []
    for key in sorted(extra):
        if key not in own:
            raise RecipeError(
                f"unknown key{did_you_mean(key, own + common)}",
                file=f(f"{table}.{key}"), key=f"{table}.{key}",
                hint=f"{what} options: {', '.join(own) or 'none'}; common keys: {', '.join(common)}",
            )
    if options_model is None:
        return None
    return validate_model(options_model, extra, file=loaded.path, prefix=table, provenance=loaded.provenance)


def _sampler(recipe: Recipe, loaded: LoadedRecipe, registry: Registry,
             model: ModelDescriptor) -> tuple[Descriptor, dict[str, Any], float, float | None]:
    """The sampler part, its own options, and the preset's defaults filled in.

    Returns the guidance in the Krea convention and mu (None: resolution-aware).
    """
    f = loaded.file_of
    s = recipe.sampler
    s.name = s.name or model.sampler
    descriptor = registry.get("sampler", s.name, key="sampler.name", file=f("sampler.name"))
    validated = part_options(loaded, s, descriptor, table="sampler", what=f"sampler {s.name!r}")
    sampler_options: dict[str, Any] = validated.model_dump() if validated is not None else {}
    s.steps = s.steps or model.steps
    if s.guidance is None:
        s.guidance = model.guidance if s.convention == "krea" else model.guidance + 1.0
    guidance = s.guidance if s.convention == "krea" else max(s.guidance - 1.0, 0.0)
    if s.mu is None:
        s.mu = model.mu if model.mu is not None else "auto"
    return descriptor, sampler_options, guidance, None if s.mu == "auto" else float(s.mu)


def _jobs(recipe: Recipe, loaded: LoadedRecipe, model: ModelDescriptor) -> list[Job]:
    """One job per image: prompt entries x count, seeds seed + i, triggers appended."""
    from krea2kit.recipe.schema import PromptEntry

    recipe.width = recipe.width or model.width
    recipe.height = recipe.height or model.height
    entries = list(recipe.prompts)
    if recipe.prompt is not None:
        entries.insert(0, PromptEntry(text=recipe.prompt))
    if not entries:
        raise RecipeError(
            "the recipe has no prompt",
            file=loaded.path, key="prompt",
            hint="add prompt = \"...\" or [[prompts]] entries, or pass --prompt TEXT",
        )
    jobs: list[Job] = []
    triggers = [lora.trigger for lora in recipe.loras if lora.trigger]
    for pi, entry in enumerate(entries):
        text = entry.text
        for trig in triggers:
            if trig not in text:
                text = f"{text}, {trig}" if text else trig
        seed = entry.seed if entry.seed is not None else recipe.seed
        count = entry.count or recipe.count
        _check_seed_range(recipe, loaded, entry, pi, seed, count)
        _check_variation_range(recipe, loaded, count)
        for i in range(count):
            jobs.append(Job(
                index=len(jobs), prompt_index=pi, prompt=text,
                negative=entry.negative if entry.negative is not None else recipe.negative,
                seed=seed + i, width=entry.width or recipe.width, height=entry.height or recipe.height,
                label=entry.name or "",
                **_variation(recipe, i),
            ))
    return jobs


def _variation(recipe: Recipe, i: int) -> dict[str, Any]:
    """Job fields for image ``i`` of a prompt entry: its own variation seed (``seed + i`` when
    ``per_image``), so an image never depends on batch size, order or worker count."""
    v = recipe.variation
    if v is None:
        return {}
    return {"variation_seed": v.seed + i if v.per_image else v.seed, "variation_strength": v.strength}


def _check_variation_range(recipe: Recipe, loaded: LoadedRecipe, count: int) -> None:
    from krea2kit.recipe.schema import MAX_SEED

    v = recipe.variation
    if v is None or not v.per_image or v.seed + count - 1 <= MAX_SEED:
        return
    raise RecipeError(
        f"variation seed {v.seed} with count {count} needs seeds up to {v.seed + count - 1}, "
        f"past the largest seed {MAX_SEED} (2**63 - 1)",
        file=loaded.file_of("variation.seed"), key="variation.seed",
        hint=f"use a variation seed of at most {MAX_SEED - count + 1}, or variation.per_image = false",
    )


def _check_seed_range(recipe: Recipe, loaded: LoadedRecipe, entry: Any, pi: int, seed: int, count: int) -> None:
    """Image i of an entry uses seed + i; the last one must still be a valid seed."""
    from krea2kit.recipe.schema import MAX_SEED

    if seed + count - 1 <= MAX_SEED:
        return
    # ``entries`` put the single ``prompt`` first; [[prompts]] indices follow it.
    index = pi - (1 if recipe.prompt is not None else 0)
    from_entry = index >= 0 and entry is recipe.prompts[index]
    seed_key = f"prompts[{index}].seed" if from_entry and entry.seed is not None else "seed"
    count_key = f"prompts[{index}].count" if from_entry and entry.count is not None else "count"
    raise RecipeError(
        f"seed {seed} with {count_key} = {count} needs seeds up to {seed + count - 1}, "
        f"past the largest seed {MAX_SEED} (2**63 - 1)",
        file=loaded.file_of(seed_key), key=seed_key,
        hint=f"use a seed of at most {MAX_SEED - count + 1}, or a smaller {count_key}",
    )


def _resolve_lora_paths(recipe: Recipe, loaded: LoadedRecipe) -> dict[int, EnvRef]:
    """Env indirection resolved now (files are checked by :func:`_check_lora_files`); default
    names. Returns the ``{env = ...}`` references by entry index, for :meth:`Plan.resolved`."""
    from pathlib import Path

    refs: dict[int, EnvRef] = {}
    for i, lora in enumerate(recipe.loras):
        if isinstance(lora.path, EnvRef):
            refs[i] = lora.path
        lora.path = _env(lora.path, f"loras[{i}].path", loaded)  # type: ignore[assignment]
        lora.name = lora.name or Path(lora.path).stem  # type: ignore[arg-type]
    return refs


def _check_lora_files(plan: Plan) -> None:
    """Each [[loras]] file exists and is a readable safetensors file (its header, not its
    tensors), so a wrong path stops the run here, not after the models loaded. WeightsError,
    exit 4, naming the file and ``loras[N].path``."""
    import stat
    from pathlib import Path

    from krea2kit.errors import WeightsError
    from krea2kit.models.weights import open_checkpoint

    for i, lora in enumerate(plan.recipe.loras):
        key = f"loras[{i}].path"
        path = Path(str(lora.path)).expanduser()
        ref = plan.lora_env_refs.get(i)
        fix = (f"set ${ref.env} to a LoRA .safetensors file" if ref is not None
               else "give the path of a LoRA .safetensors file (relative paths start in the current folder)")
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise WeightsError("LoRA file not found", file=str(path), key=key, hint=fix) from None
        except OSError as exc:
            raise WeightsError(f"cannot read the LoRA file: {exc.strerror or exc}", file=str(path), key=key) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO or device would block or never end
            raise WeightsError("not a regular file, so not a LoRA file", file=str(path), key=key, hint=fix)
        try:
            open_checkpoint(path, what="LoRA")  # headers only: checked, not parsed into tensors
        except WeightsError as exc:
            raise WeightsError(exc.message, file=exc.file or str(path), key=key, hint=exc.hint or fix) from None


def _check_image_init(loaded: LoadedRecipe) -> None:
    """A recipe from an image made from an init picture (or mask) needs the local user to
    give that file (``--set init.image=PATH``): an image never chooses a local path."""
    init = loaded.data.get("init")
    if not loaded.from_image or not isinstance(init, dict):
        return
    for key, what in (("image", "init image"), ("mask", "inpainting mask")):
        known = loaded.image_init.get(key) if isinstance(loaded.image_init.get(key), dict) else {}
        if key in init or (key == "mask" and not known):
            continue
        raise RecipeError(
            f"the image was made from an {what}{recorded_file(known)}; an image never chooses a local file",
            file=loaded.path, key=f"init.{key}",
            hint=f"give it: --set init.{key}=/path/to/{known.get('file') or 'picture.png'}",
        )


def _check_expander(plan: Plan, registry: Registry) -> None:
    """[expander]: its backend is registered and its system prompt file readable, before anything loads."""
    from krea2kit.recipe.expander import check_plan

    check_plan(plan, registry)


def _check_init_files(plan: Plan) -> None:
    """The [init] image and mask exist and are pictures Pillow can read, within the size cap."""
    from krea2kit.recipe.init_image import check_init

    check_init(plan.recipe.init, plan.loaded.file_of)


def _check_file_names(plan: Plan) -> None:
    """Output folder, names, quality and metadata size: RecipeErrors naming their output.* key."""
    from krea2kit.recipe.outputs import check_outputs

    check_outputs(plan)


def _sliders(recipe: Recipe, loaded: LoadedRecipe, registry: Registry,
             plugin_options: dict[str, Any]) -> list[tuple[Any, Descriptor, Any]]:
    """Each ``[[sliders]]`` entry built by its kind (a slider holds no weights) and asked,
    through :class:`krea2kit.contracts.Slider`, which LoRAs it drives and its value range."""
    where = loaded.file_of("sliders")
    lora_names = [lora.name for lora in recipe.loras]
    out = []
    for i, slider in enumerate(recipe.sliders):
        kind = registry.get("slider", slider.kind, key=f"sliders[{i}].kind", file=where)
        options = kind.validate_options(dict(slider.model_extra or {}), where=f"sliders[{i}]", file=where)
        part = _build_slider(kind, options, slider.name, plugin_options.get(kind.plugin), where, i)
        for bound in part.loras:
            if bound not in lora_names and not _references.is_slider_target(bound, recipe):  # "reference:NAME"
                raise RecipeError(
                    f"slider {slider.name!r} is bound to LoRA {bound!r}, which is not in [[loras]]"
                    + did_you_mean(bound, lora_names),
                    file=where, key=f"sliders[{i}].loras",
                    hint=f"[[loras]] names: {', '.join(lora_names) or 'none'}",
                )
        lo, hi = part.range
        if not lo <= slider.value <= hi:
            raise RecipeError(f"slider value {slider.value:g} is outside its range [{lo:g}, {hi:g}]",
                              file=where, key=f"sliders[{i}].value")
        out.append((slider, kind, part))
    return out


def _build_slider(kind: Descriptor, options: Any, name: str, plugin_options: Any, where: str | None, i: int) -> Any:
    """``kind``'s ``load(options, context)`` for one entry; a slider that cannot be built is
    a recipe error at ``sliders[i]`` (or a plugin error when the kind itself misbehaves)."""
    from krea2kit.contracts import LoadContext, Slider, missing_members
    from krea2kit.errors import Krea2kitError, PluginError, UsageError

    who = f"slider kind {kind.name!r} from plugin {kind.plugin or '?'!r}"
    try:
        part = kind.load_part(options, LoadContext(role="slider", name=name, plugin_options=plugin_options))
    except UsageError as exc:  # the entry's own values (e.g. a default outside the range)
        raise RecipeError(exc.message, file=where, key=f"sliders[{i}]", hint=exc.hint) from None
    except Krea2kitError:
        raise
    except Exception as exc:
        raise PluginError(f"{who} could not build slider {name!r}: {type(exc).__name__}: {exc}",
                          file=where, key=f"sliders[{i}]") from None
    missing = missing_members(part, Slider)
    if missing:
        raise PluginError(f"{who}: the slider it built lacks {', '.join(missing)} (contracts.Slider)",
                          hint="check it with `krea2kit plugins --check`")
    return part


def _filters(recipe: Recipe, loaded: LoadedRecipe, registry: Registry,
             settings: Settings) -> list[tuple[Descriptor, Any]]:
    """Every registered filter runs (installing a filter plugin enables it); a recipe can
    require some to be present, so it fails here rather than run without them. Options are
    validated with the deployer's settings in the context, so a recipe that tries to loosen
    a filter is refused here, before anything loads."""
    f = loaded.file_of
    for i, name in enumerate(recipe.safety.filters):
        registry.get("filter", name, key=f"safety.filters[{i}]", file=f("safety.filters"))
    registered = registry.all("filter")
    known = [d.name for d in registered]
    for name in recipe.safety.settings:
        if name not in known:
            raise RecipeError(f"no filter named {name!r}" + did_you_mean(name, known),
                              file=f("safety.settings"), key=f"safety.settings.{name}")
    return [(d, d.validate_options(dict(recipe.safety.settings.get(d.name, {})),
                                   where=f"safety.settings.{d.name}", file=f("safety.settings"),
                                   context={"settings": settings}))
            for d in registered]


def _plugin_tables(recipe: Recipe, loaded: LoadedRecipe, registry: Registry) -> dict[str, Any]:
    """``[plugins.<name>]`` tables, each validated by the schema its plugin declares."""
    f = loaded.file_of
    tables = {d.name: d for d in registry.all("options")}
    out = {}
    for name, values in recipe.plugins.items():
        if name not in tables:
            raise RecipeError(
                f"no plugin declares a [plugins.{name}] table" + did_you_mean(name, list(tables)),
                file=f(f"plugins.{name}"), key=f"plugins.{name}",
                hint=f"tables declared: {', '.join(sorted(tables)) or 'none'}",
            )
        out[name] = tables[name].validate_options(values, where=f"plugins.{name}", file=f(f"plugins.{name}"))
    return out
