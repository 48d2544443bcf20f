"""Typed registries of light descriptors.

A descriptor names a part, says what it is for, declares its options schema and knows
how to ``load()`` it. Nothing heavy is imported until ``load`` runs, so ``krea2kit
plugins`` and ``--help`` stay fast and torch-free.

Schemas may be given as a pydantic model class or as a lazy ``"module:Class"`` string,
so a plugin can keep a torch-importing module out of the listing path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from krea2kit.errors import PluginError, RecipeError


def resolve_ref(ref: Any) -> Any:
    """Turn a lazy ``"package.module:attr"`` reference into the object it names."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise PluginError(f"bad lazy reference {ref!r}: expected 'module:attribute'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Descriptor:
    """Common fields of every registered part."""

    kind: ClassVar[str] = "part"
    name: str
    summary: str
    load: Callable[..., Any] | str | None = None
    options: Any = None  # pydantic model class, "module:Class", or None
    version: str = ""
    plugin: str = field(default="", compare=False)  # filled in by the host
    # An example options table the conformance checker (`krea2kit plugins --check`) loads the
    # part with, for schemas that need values (a slider must name its LoRA); {} when None.
    check_options: Any = field(default=None, compare=False)

    def load_problem(self) -> str | None:
        """Why this part's ``load`` cannot be called as ``load(options, context)`` (the one
        load convention of every kind, :mod:`krea2kit.contracts`), or ``None``. Imports the
        lazy reference, nothing more."""
        import inspect

        from krea2kit.contracts import LoadContext

        try:
            load = resolve_ref(self.load)
        except Exception as exc:  # an unimportable lazy reference
            return f"load {self.load!r} cannot be imported: {type(exc).__name__}: {exc}"
        if load is None:
            return "it has nothing to load"
        try:
            inspect.signature(load).bind(None, LoadContext())
        except TypeError as exc:
            return f"its load() cannot be called as load(options, context) ({exc})"
        except ValueError:  # a builtin without an introspectable signature: trust it
            pass
        return None

    def load_part(self, options: Any = None, context: Any = None) -> Any:
        """Call this part's ``load(options, context)``. ``context`` defaults to a
        :class:`~krea2kit.contracts.LoadContext` naming this part. A ``load`` that cannot
        take those two arguments is a :class:`PluginError` naming the plugin, not a
        ``TypeError`` from deep inside a run."""
        from krea2kit.contracts import CONTRACT_VERSION, LoadContext

        problem = self.load_problem()
        if problem:
            raise PluginError(
                f"{self.kind.replace('_', ' ')} {self.name!r} from plugin {self.plugin or '?'!r}: {problem}",
                hint=f"krea2kit plugin contract {CONTRACT_VERSION}: every load is `def load(options, context)`; "
                     "see CONTRIBUTING.md 'Writing a plugin' and `krea2kit plugins --check`",
            )
        if context is None:
            context = LoadContext(role=self.kind, name=self.name)
        return resolve_ref(self.load)(options, context)

    def options_model(self):
        return resolve_ref(self.options) if self.options is not None else None

    def validate_options(self, values: dict, *, where: str, file: str | None = None,
                         context: dict[str, Any] | None = None) -> Any:
        """Validate ``values`` with this part's options schema (``None`` if it has none);
        ``context`` reaches its validators as pydantic's ``info.context``."""
        model = self.options_model()
        if model is None:
            if values:
                raise RecipeError(
                    f"{self.kind} {self.name!r} takes no options, got {', '.join(sorted(values))}",
                    file=file, key=where,
                )
            return None
        from krea2kit.validation import validate_model

        return validate_model(model, values, file=file, prefix=where, context=context)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "name": self.name, "summary": self.summary}
        if self.version:
            out["version"] = self.version
        for f in fields(self):
            if f.name in {"name", "summary", "load", "options", "version", "plugin", "check_options"}:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (str, int, float, bool, type(None), list, tuple, dict)):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class ModelDescriptor(Descriptor):
    """A model preset: which parts make it and the sampling defaults it was made for.

    ``weights`` maps a part role ("dit", "text_encoder", "vae") to a default location
    (a path, ``"package:relative/path"`` for weights shipped in a package, or "" when
    the user must supply it); ``hf_repos`` names Hugging Face repos whose existing
    local cache may hold them (never downloaded implicitly). ``dit_config`` and
    ``vae_config`` name an architecture config of those parts (their loaders' presets;
    "" = read it from the weights), handed over as ``LoadContext.config``; a text encoder
    reads its own from its ``config.json`` or tensor shapes.
    """

    kind: ClassVar[str] = "model"
    dit: str = "krea2"
    text_encoder: str = "qwen3-vl"
    vae: str = "qwen-image"
    dit_config: str = ""
    vae_config: str = ""
    sampler: str = "euler"
    steps: int = 8
    guidance: float = 0.0
    mu: float | None = None  # None = resolution-aware shift
    width: int = 1024
    height: int = 1024
    latent_channels: int = 16  # what the transformer consumes (checked against the VAE contract)
    latent_factor: int = 8  # the preset VAE's pixels per latent cell, for estimates before it loads;
    # a run takes the factor from the loaded VAE's contract, and any VAE with the right channels fits
    release_text_encoder: bool = True  # free the encoder once prompts are encoded (big models)
    layout: str = "official"  # token layout: "official" (reference padding) or "compact"
    weights: dict = field(default_factory=dict, hash=False, compare=False)
    hf_repos: tuple = ()
    weights_env: dict = field(default_factory=dict, hash=False, compare=False)

    def part_config(self, role: str) -> str:
        """The named architecture config for the part in ``role`` (``LoadContext.config``)."""
        return {"dit": self.dit_config, "vae": self.vae_config}.get(role, "")


@dataclass(frozen=True)
class DiTDescriptor(Descriptor):
    kind: ClassVar[str] = "dit"


@dataclass(frozen=True)
class VAEDescriptor(Descriptor):
    kind: ClassVar[str] = "vae"
    contract: Any = None  # LatentContract of the latents it produces


@dataclass(frozen=True)
class TextEncoderDescriptor(Descriptor):
    kind: ClassVar[str] = "text_encoder"


@dataclass(frozen=True)
class SamplerDescriptor(Descriptor):
    kind: ClassVar[str] = "sampler"
    stochastic: bool = False


@dataclass(frozen=True)
class LoraFormatDescriptor(Descriptor):
    kind: ClassVar[str] = "lora_format"


@dataclass(frozen=True)
class SliderDescriptor(Descriptor):
    kind: ClassVar[str] = "slider"


@dataclass(frozen=True)
class FilterDescriptor(Descriptor):
    """A content filter. ``kind_of_input`` is "prompt" or "image". ``mandatory`` filters
    can be switched off only by the deployer's settings, never by a recipe."""

    kind: ClassVar[str] = "filter"
    target: str = "image"
    mandatory: bool = False


@dataclass(frozen=True)
class WriterDescriptor(Descriptor):
    kind: ClassVar[str] = "writer"
    extension: str = ""


@dataclass(frozen=True)
class PromptExpanderDescriptor(Descriptor):
    """A prompt expander backend, named by a recipe's ``[expander] backend``. ``needs`` says
    what it talks to ("endpoint", "weights"), for the listing only."""

    kind: ClassVar[str] = "prompt_expander"
    needs: str = ""


@dataclass(frozen=True)
class EmbedderDescriptor(Descriptor):
    """An image embedder for diversity scores, named by a recipe's ``[diversity] embedder``.
    ``needs_weights``: it loads weights the user must point at (its ``load`` raises a
    ``WeightsError`` naming the option when none is given; ``plugins --check`` then skips it)."""

    kind: ClassVar[str] = "embedder"
    needs_weights: bool = False


@dataclass(frozen=True)
class RunnerDescriptor(Descriptor):
    """A job runner, selected by ``krea2kit run --on NAME``; ``options`` is the schema of its
    ``--runner-opt KEY=VALUE`` settings (``--address`` is the option ``address``)."""

    kind: ClassVar[str] = "runner"


@dataclass(frozen=True)
class OptionsDescriptor(Descriptor):
    """The schema of a plugin's ``[plugins.<name>]`` table; ``name`` is the table name."""

    kind: ClassVar[str] = "options"


# hook name -> descriptor class it accepts
HOOK_KINDS: dict[str, type[Descriptor]] = {
    "register_models": ModelDescriptor,
    "register_dits": DiTDescriptor,
    "register_vaes": VAEDescriptor,
    "register_text_encoders": TextEncoderDescriptor,
    "register_samplers": SamplerDescriptor,
    "register_lora_formats": LoraFormatDescriptor,
    "register_sliders": SliderDescriptor,
    "register_filters": FilterDescriptor,
    "register_writers": WriterDescriptor,
    "register_embedders": EmbedderDescriptor,
    "register_prompt_expanders": PromptExpanderDescriptor,
    "register_runners": RunnerDescriptor,
    "register_options": OptionsDescriptor,
}
KINDS: dict[str, type[Descriptor]] = {cls.kind: cls for cls in HOOK_KINDS.values()}


class Registry:
    """All registered parts, by kind and name. Two plugins registering the same name is a
    clash: it is reported, and the name can then only be used as ``plugin:name``."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, list[Descriptor]]] = {k: {} for k in KINDS}

    def add(self, descriptor: Descriptor) -> None:
        self._parts[descriptor.kind].setdefault(descriptor.name, []).append(descriptor)

    @property
    def clashes(self) -> dict[tuple[str, str], list[str]]:
        """(kind, name) -> the plugins that all registered it."""
        return {
            (kind, name): [d.plugin for d in found]
            for kind, table in self._parts.items()
            for name, found in table.items()
            if len(found) > 1
        }

    def names(self, kind: str) -> list[str]:
        return sorted(self._parts[kind])

    def all(self, kind: str) -> list[Descriptor]:
        """Every descriptor of a kind, clashing ones included, sorted by name then plugin."""
        return [d for n in sorted(self._parts[kind]) for d in self._parts[kind][n]]

    def get(self, kind: str, name: str, *, key: str | None = None, file: str | None = None) -> Descriptor:
        """Find a part by name; ``plugin:name`` picks one side of a clash."""
        plugin = None
        if ":" in name:
            plugin, _, name = name.partition(":")
        found = self._parts[kind].get(name, [])
        if plugin is not None:
            found = [d for d in found if d.plugin == plugin]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            owners = ", ".join(d.plugin for d in found)
            raise RecipeError(
                f"{kind.replace('_', ' ')} {name!r} is registered by several plugins ({owners})",
                file=file, key=key,
                hint=f"name the one you want as 'PLUGIN:{name}', or choose plugins with KREA2KIT_PLUGINS",
            )
        from krea2kit.validation import did_you_mean

        known = self.names(kind)
        label = kind.replace("_", " ")
        raise RecipeError(
            f"unknown {label} {name!r}" + (f" from plugin {plugin!r}" if plugin else "") + did_you_mean(name, known),
            file=file, key=key,
            hint=f"registered {label}s: {', '.join(known) or 'none'} (see `krea2kit plugins`)",
        )


def _call_text(protocol: Any, method: str) -> str:
    """``name(a, b, *, c)`` from a protocol method's own signature (without ``self``)."""
    import inspect

    sig = inspect.signature(getattr(protocol, method))
    parts: list[str] = []
    star = False
    for p in list(sig.parameters.values())[1:]:
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            star = True
            parts.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            parts.append(p.name + ("" if p.default is p.empty else f"={p.default!r}"))
    shown = "sampler" if method == "__call__" else method
    return f"{shown}({', '.join(parts)})"


def contributing_table() -> str:
    """The part-kind table of CONTRIBUTING.md ("Writing a plugin"), generated from the
    protocols of :mod:`krea2kit.contracts`; ``tests/contracts/test_contributing_table.py`` keeps the two equal."""
    from krea2kit.contracts import OPTIONS_FROM, PROTOCOLS, protocol_members

    rows = ["| hook | descriptor | `load(options, context)` returns | `options` come from |", "|---|---|---|---|"]
    for hook, cls in HOOK_KINDS.items():
        if cls.kind not in PROTOCOLS:
            continue
        protocols = PROTOCOLS[cls.kind]
        cells = []
        for protocol in protocols if isinstance(protocols, tuple) else (protocols,):
            attributes, methods = protocol_members(protocol)
            members = [f"`{a}`" for a in attributes] + [f"`{_call_text(protocol, m)}`" for m in methods]
            cells.append(f"`{protocol.__name__}`: " + ", ".join(members))
        rows.append(f"| `{hook}` | `{cls.__name__}` | {' / '.join(cells)} | {OPTIONS_FROM[cls.kind]} |")
    return "\n".join(rows)
