"""The plugin contract: what the host calls on every kind of part, as typed protocols.

This module is the reference for plugin authors (CONTRIBUTING.md's table is generated
from it by :func:`krea2kit.registry.contributing_table` and checked by a test). It
imports nothing heavy: tensor types appear only in annotations.

**One load convention for every kind.** A descriptor's ``load`` is called as::

    part = load(options, context)

* ``options``: the part's own settings, validated against the descriptor's ``options``
  schema (a pydantic model instance), or ``None`` when the descriptor declares no schema
  or the recipe sets nothing. Where they come from in a recipe is in :data:`OPTIONS_FROM`.
* ``context``: a :class:`LoadContext`: where the weights are, the device and dtype, the
  run-wide model settings, the deployer's settings and the plugin's own
  ``[plugins.<name>]`` table.

What ``load`` returns must satisfy the protocol of its kind (:data:`PROTOCOLS`);
``krea2kit plugins --check`` and :func:`krea2kit.testing.check_part` verify it.

**Conventions shared by every part** (those of the official Krea 2 sampler):

* images are ``(B, 3, H, W)`` float tensors in ``[-1, 1]``, RGB, NCHW;
* latents are ``(B, C, H/f, W/f)`` with ``C`` and ``f`` the VAE's
  :class:`LatentContract` ``channels`` and ``factor``;
* flow time ``sigma`` runs from 1 (pure noise) to 0 (clean):
  ``x_t = sigma * noise + (1 - sigma) * x0``, and the model predicts the velocity
  ``v = noise - x0`` (so ``dx/dsigma = v`` and ``x0 = x_t - sigma * v``);
* an image's pixel size is a multiple of ``vae.contract.factor * dit.patch_size``
  (the pipeline pads up and crops back).

**Versioning.** :data:`CONTRACT_VERSION` grows by one whenever a protocol or the load
convention changes incompatibly. A plugin states the version it was written for with a
module attribute ``KREA2KIT_CONTRACT = 2`` beside its hook implementations; the host skips
(with a warning) a plugin that needs a newer contract than it provides, or one written for
a contract older than :data:`OLDEST_SUPPORTED_CONTRACT`. ``krea2kit plugins --json`` shows
both numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from krea2kit.models.contract import LatentContract

if TYPE_CHECKING:  # pragma: no cover - annotations only; keeps torch off the listing path
    import torch
    from PIL import Image

    from krea2kit.lora.formats import LoraFile
    from krea2kit.safety.verdict import Verdict
    from krea2kit.settings import Settings

#: The version of the contract this krea2kit provides (the load convention and protocols).
CONTRACT_VERSION = 2
#: Plugins that state an older version than this are skipped (their parts would not load).
OLDEST_SUPPORTED_CONTRACT = 2
#: The module attribute a plugin sets to the contract version it was written for.
PLUGIN_CONTRACT_ATTRIBUTE = "KREA2KIT_CONTRACT"

__all__ = [
    "CONTRACT_VERSION", "OLDEST_SUPPORTED_CONTRACT", "PLUGIN_CONTRACT_ATTRIBUTE",
    "LoadContext", "OutputInfo", "LatentContract", "PartLoader",
    "Denoiser", "StepCallback", "DiTPart", "TextEncoderPart", "VAEPart", "Sampler", "LoraFormat",
    "Slider", "PromptFilter", "ImageFilter", "Writer", "PromptExpander", "Embedder", "Runner", "PROTOCOLS", "OPTIONS_FROM", "LOADS_WEIGHTS",
    "HOST_CALLS", "protocol_for", "protocol_members", "missing_members", "size_multiple",
]


@dataclass(frozen=True)
class LoadContext:
    """Everything the host hands a part's ``load`` besides its own options.

    role: the part kind being loaded ("dit", "text_encoder", "vae", "sampler",
        "lora_format", "slider", "filter", "writer", "embedder").
    name: the name the part is used under: the descriptor's name, or for a slider its
        ``[[sliders]]`` entry name.
    location: the weights (a file or folder path) for "dit", "text_encoder" and "vae";
        "" for other kinds.
    config: the model preset's named architecture config for this part ("" = infer it
        from the weights).
    device, dtype: where and in which torch dtype to load (``"cpu"``, ``"cuda"``,
        ``"mps"``; ``"float32"``, ``"bfloat16"``, ``"float16"``), already resolved.
    layout: the recipe's ``model.layout``, the text token layout of the run:
        "official" (reference padding) or "compact" (padding dropped).
    vae_tile_threshold: the recipe's ``model.vae_tile_threshold``: decode in tiles above
        this many pixels (``None`` = the VAE's own default).
    weights_dtype: the recipe's ``model.weights_dtype`` when loading the transformer ("dit"),
        its ``model.text_encoder_weights_dtype`` when loading the text encoder, "auto" for
        every other role: "auto" loads the weights as stored; "fp8" / "int8" ask the part to
        quantize a full-precision file while loading it (a part without a quantized path may
        refuse it with a ``WeightsError``).
    offload: the recipe's ``model.offload`` when loading the transformer ("dit"), "none"
        for every other role (and when the recipe leaves it to the preset): "blocks" asks the
        transformer to keep its blocks in host memory and stream them to ``device`` one block
        ahead (:mod:`krea2kit.models.offload`); a part that cannot may ignore it.
    settings: the deployer's :class:`krea2kit.settings.Settings` (user config), e.g. the
        image filter ceiling or whether prompt embeddings are cached; ``None`` in tests.
    plugin_options: the validated ``[plugins.<plugin>]`` table of the part's plugin
        (see the ``register_options`` hook), or ``None``.
    """

    role: str = ""
    name: str = ""
    location: str = ""
    config: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    layout: str = "official"
    vae_tile_threshold: int | None = None
    weights_dtype: str = "auto"
    offload: str = "none"
    settings: Settings | None = field(default=None, compare=False)
    plugin_options: Any = field(default=None, compare=False)


class PartLoader(Protocol):
    """A descriptor's ``load``: ``load(options, context) -> part`` for every kind."""

    def __call__(self, options: Any, context: LoadContext, /) -> Any: ...


# --- the sampler's view of the model --------------------------------------------------------

#: ``denoise(x, sigma) -> v``: latents (B, C, H/f, W/f) at flow time ``sigma`` in [0, 1]
#: (a float) to the velocity ``v = noise - x0``, same shape and dtype as ``x``.
Denoiser = Callable[["torch.Tensor", float], "torch.Tensor"]
#: ``callback(step_index, total_steps, sigma_next, x)``, called after every step.
StepCallback = Callable[[int, int, float, "torch.Tensor"], None]


# --- model parts ----------------------------------------------------------------------------


@runtime_checkable
class DiTPart(Protocol):
    """A diffusion transformer. ``load(options, context)`` reads ``context.location``.

    identity: a fingerprint of the weights (recorded in every image's metadata).
    module: the ``torch.nn.Module`` runtime LoRA adapters attach to (its submodule names
        are what LoRA files name).
    patch_size: latent cells per token side (Krea 2: 2). The pipeline makes image sizes a
        multiple of ``vae.contract.factor * patch_size``.
    in_channels: latent channels it consumes; must equal the VAE's ``contract.channels``.
    text_shape: ``(tapped layers, width)`` of the text hidden states it fuses, or ``None``
        if it takes any; the pipeline refuses an encoder that does not fit.
    """

    identity: str
    module: Any
    patch_size: int
    in_channels: int
    text_shape: tuple[int, int] | None

    def make_denoiser(self, cond: tuple[torch.Tensor, torch.Tensor],
                      uncond: tuple[torch.Tensor, torch.Tensor] | None, *, guidance: float,
                      latent_size: tuple[int, int]) -> Denoiser:
        """A :data:`Denoiser` for one image.

        cond, uncond: ``(hidden (1, L, taps, D), mask (1, L) bool)`` from the text encoder;
            ``uncond`` (the negative prompt) is ``None`` when guidance is off.
        guidance: Krea's ``g`` (``v = cond + g * (cond - uncond)``; on iff ``g > 0``).
        latent_size: ``(H/f, W/f)``, the latent height and width, multiples of ``patch_size``.
        """
        ...


@runtime_checkable
class TextEncoderPart(Protocol):
    """A text encoder. ``load(options, context)`` reads ``context.location`` and honours
    ``context.layout``.

    identity: a fingerprint of the weights (metadata, prompt cache key).
    """

    identity: str

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (B, L, taps, D) float, mask (B, L) bool)`` for B texts, in order."""
        ...

    def take_warnings(self) -> list[str]:
        """Notes since the last call (e.g. a prompt was truncated), shown to the user; ``[]``
        when there are none."""
        ...


@runtime_checkable
class VAEPart(Protocol):
    """An autoencoder. ``load(options, context)`` reads ``context.location`` and honours
    ``context.vae_tile_threshold``.

    identity: a fingerprint of the weights.
    contract: the :class:`LatentContract` of its latents (channels, factor f); must equal
        the descriptor's ``contract``.
    """

    identity: str
    contract: LatentContract

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] (H, W multiples of f) -> latents ``(B, C, H/f, W/f)``."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, H/f, W/f)`` -> images ``(B, 3, H, W)``, nominally in [-1, 1]
        (the pipeline clamps)."""
        ...


# --- sampling -------------------------------------------------------------------------------


@runtime_checkable
class Sampler(Protocol):
    """A sampler: ``load(options, context)`` returns this function.

    ``sampler(denoise, x, sigmas, *, generator=None, callback=None, **options) -> x0``

    denoise: a :data:`Denoiser`. x: the starting noise ``(B, C, H/f, W/f)``.
    sigmas: ``steps + 1`` flow times from 1 down to 0 (a float32 CPU tensor).
    generator: a ``torch.Generator`` (or one per batch row) for any fresh noise.
    callback: a :data:`StepCallback`; call it after every step so progress moves.
    options: the recipe's sampler options (the same values ``load`` received), as keywords.
    Returns the clean latents, same shape as ``x``.
    """

    def __call__(self, denoise: Denoiser, x: torch.Tensor, sigmas: Any, *, generator: Any = None,
                 callback: StepCallback | None = None, **options: Any) -> torch.Tensor: ...


# --- adapters -------------------------------------------------------------------------------


@runtime_checkable
class LoraFormat(Protocol):
    """A LoRA file layout. ``load(options, context)`` returns an object with:"""

    def detect(self, keys: Collection[str], metadata: Mapping[str, str]) -> bool:
        """Whether this format reads a safetensors file with these tensor names and header
        metadata (cheap: no tensor is read). Must return ``False`` for an empty key set
        unless the format is a catch-all."""
        ...

    def parse(self, path: str | Path, *, strict: bool = False, name: str | None = None) -> LoraFile:
        """Read the file into krea2kit's per-module form (:class:`krea2kit.lora.formats.LoraFile`).
        ``strict``: keys that match no module are an error instead of a warning."""
        ...


@runtime_checkable
class Slider(Protocol):
    """One ``[[sliders]]`` entry: ``load(options, context)`` builds it, with ``context.name``
    the entry's name and ``options`` its validated keys. The host builds it when it plans the
    recipe (before any weights load; keep ``load`` cheap) and refuses the recipe when ``loras``
    names a LoRA it lacks or the entry's value is outside ``range``.

    name: the slider's name. loras: the ``[[loras]]`` names it drives.
    range: ``(min, max)`` of its value.
    """

    name: str
    loras: tuple[str, ...]
    range: tuple[float, float]

    def strength_fns(self, value: float | None = None) -> dict[str, Callable[[int, int], float]]:
        """``{lora name: fn(step, total_steps) -> strength}`` at ``value`` (``None``: its default)."""
        ...


# --- safety and output ----------------------------------------------------------------------


@runtime_checkable
class PromptFilter(Protocol):
    """A prompt content filter (``FilterDescriptor(target="prompt")``).

    Every registered filter runs on every prompt; any block wins; a filter that raises,
    times out or fails to load blocks. ``name`` and ``version`` are recorded in the verdict.
    """

    name: str
    version: str

    def check_prompt(self, text: str) -> Verdict:
        """A :class:`krea2kit.safety.verdict.Verdict` for one prompt or negative prompt."""
        ...


@runtime_checkable
class ImageFilter(Protocol):
    """An image content filter (``FilterDescriptor(target="image")``), run on every decoded
    image before it is written."""

    name: str
    version: str

    def check_image(self, image: Image.Image) -> Verdict:
        """A :class:`krea2kit.safety.verdict.Verdict` for one RGB ``PIL.Image``."""
        ...


@dataclass(frozen=True)
class OutputInfo:
    """What the host hands a :class:`Writer` besides the image (filled in per image by the run)."""

    metadata: Any  # krea2kit.output.metadata.ImageMetadata
    prompt: str | None  # None when the recipe keeps prompts private
    negative: str | None
    seed: int
    index: int
    quality: int | None = None
    # Replace an existing file (output.overwrite); otherwise the writer must not: it takes the
    # next free -2, -3 … name (krea2kit's writers) or raises FileExistsError (OutputPlanner.write
    # then tries the next name). Set by OutputPlanner.write.
    overwrite: bool = False


@runtime_checkable
class Writer(Protocol):
    """An output writer, selected by ``output.format``.

    extension: the file suffix it writes, with the dot (".png").
    """

    extension: str

    def write(self, image: Image.Image, path: Path, info: OutputInfo) -> Path:
        """Write one RGB ``PIL.Image`` at ``path`` (which already ends in ``extension``;
        its folder exists) atomically (never leave a partial file), with ``info.metadata``.
        Unless ``info.overwrite``, never replace an existing file: take the next free name or
        raise ``FileExistsError`` (``krea2kit.files.atomic_write`` does both safely).
        Return the path written."""
        ...




# --- prompt expansion -----------------------------------------------------------------------


@runtime_checkable
class PromptExpander(Protocol):
    """A prompt expander (``[expander] backend``): rewrites a short prompt into a fuller one
    with a language model. ``load(options, context)`` reads where the model is (an endpoint,
    a weights folder) from ``context.settings`` (the user config), never from a recipe.

    identity: what produced the text, without secrets (e.g. ``"openai:qwen3-vl-4b"``); part
        of the expansion cache key and recorded in image metadata. Never an API key or URL
        credentials.
    """

    identity: str

    def expand(self, prompt: str, *, system_prompt: str, seed: int, temperature: float,
               max_tokens: int) -> str:
        """The expanded prompt for ``prompt`` under ``system_prompt``: plain text, may be
        empty (the host treats an empty answer as a failure). Raise
        :class:`krea2kit.expander.ExpanderError` (or any exception) when the model cannot
        answer; never block longer than the part's own timeouts."""
        ...


# --- diversity ------------------------------------------------------------------------------


@runtime_checkable
class Embedder(Protocol):
    """An image embedder for diversity scores and "keep the k most diverse" (``[diversity]
    embedder``). ``load(options, context)`` gets the ``[diversity]`` keys beside the common
    ones as ``options``; a part that needs weights reads their location from its plugin's
    ``[plugins.<name>]`` table (``context.plugin_options``) or the environment, never downloads
    them, and raises a ``WeightsError`` naming that option when none is given.

    name: what made the embeddings, recorded with the scores in image metadata (a model and
        weights fingerprint, or a versioned method name such as ``"lab-hog-1"``).
    dim: ``d``, the length of each embedding.
    """

    name: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(n, d)`` float tensor for ``n`` RGB ``PIL.Image`` s of any size, in order, each row
        L2-normalised (unit length; cosine similarity is then a dot product). Deterministic:
        the same image gives the same row whatever else is in the batch."""
        ...


# --- job runners ----------------------------------------------------------------------------


@runtime_checkable
class Runner(Protocol):
    """Where a batch job's items render (``krea2kit run JOB --on NAME``). ``load(options,
    context)`` gets its validated ``--runner-opt`` settings as ``options``.

    name: the runner's name, for messages.

    A runner decides only *where* each item runs: its seed, pixels and file name are fixed by
    the job (:mod:`krea2kit.jobs`). It may yield the items in any order; the host appends a
    manifest line for each record as it arrives, so a runner must yield an item only once
    its image is written (or blocked).
    """

    name: str

    def run(self, job: Any, items: Sequence[int], *, session: Any, events: Callable[..., None]) -> Iterator[Any]:
        """Render the items ``items`` (indices into the job) of ``job`` (a
        :class:`krea2kit.jobs.BatchJob`: ``job.spec`` is plain data to send elsewhere,
        ``job.plans`` the plans made in this process) and yield one
        :class:`krea2kit.pipeline.Record` per item as it finishes. ``session`` is the caller's
        :class:`krea2kit.api.Session` (its parts stay loaded); ``events`` the progress callback
        (``events("job_end", record=...)`` per item when the pipeline does not send it)."""
        ...


#: descriptor kind -> the protocol its ``load`` result satisfies ("filter" depends on the
#: descriptor's ``target``: see :func:`protocol_for`).
PROTOCOLS: dict[str, Any] = {
    "dit": DiTPart,
    "text_encoder": TextEncoderPart,
    "vae": VAEPart,
    "sampler": Sampler,
    "lora_format": LoraFormat,
    "slider": Slider,
    "filter": (PromptFilter, ImageFilter),
    "writer": Writer,
    "embedder": Embedder,
    "prompt_expander": PromptExpander,
    "runner": Runner,
}

#: descriptor kind -> where a recipe sets the ``options`` its ``load`` receives.
OPTIONS_FROM: dict[str, str] = {
    "dit": "`None` (run-wide model settings are in the context)",
    "text_encoder": "`None` (run-wide model settings are in the context)",
    "vae": "`None` (run-wide model settings are in the context)",
    "sampler": "the `[sampler]` keys beside the common ones (also passed to each call)",
    "lora_format": "`None`",
    "slider": "the `[[sliders]]` entry's keys beside `name`, `value`, `kind`",
    "filter": "`[safety.settings.<filter name>]`",
    "writer": "`None` (the plugin's `[plugins.<name>]` table is `context.plugin_options`)",
    "embedder": "the `[diversity]` keys beside `embedder`, `keep`, `method` (weights: the plugin's "
                "`[plugins.<name>]` table, `context.plugin_options`)",
    "prompt_expander": "`None` (endpoint, key and weights come from the user config, `context.settings`; "
                       "the `[expander]` sampling settings are passed to each `expand` call)",
    "runner": "`krea2kit run --on NAME --runner-opt KEY=VALUE` (and `--address`), never a recipe",
}

#: kinds whose ``load`` reads weights from ``context.location``.
LOADS_WEIGHTS = ("dit", "text_encoder", "vae")


def protocol_for(kind: str, target: str = "image") -> Any:
    """The protocol a part of ``kind`` satisfies (filters: by ``target``)."""
    if kind == "filter":
        return PromptFilter if target == "prompt" else ImageFilter
    return PROTOCOLS[kind]


def size_multiple(vae: VAEPart, dit: DiTPart) -> int:
    """Pixels per transformer token side: image sizes are multiples of this."""
    return int(vae.contract.factor) * int(dit.patch_size)


#: How the host calls each protocol method: (positional argument count, keyword names).
#: The conformance checker binds these against a part's real signatures.
HOST_CALLS: dict[str, tuple[int, tuple[str, ...]]] = {
    "make_denoiser": (2, ("guidance", "latent_size")),
    "encode": (1, ()),
    "take_warnings": (0, ()),
    "decode": (1, ()),
    "__call__": (3, ("generator", "callback")),
    "detect": (2, ()),
    "parse": (1, ("strict", "name")),
    "strength_fns": (1, ()),
    "check_prompt": (1, ()),
    "check_image": (1, ()),
    "write": (3, ()),
    "embed": (1, ()),
    "expand": (1, ("system_prompt", "seed", "temperature", "max_tokens")),
    "run": (2, ("session", "events")),
}


def protocol_members(protocol: Any) -> tuple[list[str], list[str]]:
    """``(attributes, methods)`` a protocol declares, in declaration order."""
    attributes = list(getattr(protocol, "__annotations__", {}))
    methods = [name for name, value in vars(protocol).items()
               if callable(value) and name in HOST_CALLS]
    return attributes, methods


def missing_members(part: Any, protocol: Any) -> list[str]:
    """What ``part`` lacks of ``protocol``: attribute and method names, with ``()`` on
    methods; ``[]`` when it has them all. Cheap (no call), so the host runs it on every load."""
    attributes, methods = protocol_members(protocol)
    missing = [name for name in attributes if not hasattr(part, name)]
    for name in methods:
        target = part if name == "__call__" else getattr(part, name, None)
        if target is None or not callable(target):
            missing.append(f"{name}()")
    return missing
