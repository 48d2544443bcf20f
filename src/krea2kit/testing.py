"""Conformance checks of parts against :mod:`krea2kit.contracts`, for ``krea2kit plugins
--check`` and for plugin authors' own tests::

    from krea2kit.testing import check_plugin

    def test_my_plugin_follows_the_contract():
        check_plugin(my_plugin_module)       # AssertionError naming every failing part

Each registered part is loaded the way the pipeline loads it (``load(options, context)``
with its options schema's defaults) and given a tiny input:

* sampler: one step of the exact velocity of a constant image must land on it;
* VAE: decode a 4x4 latent of its declared channels, encode a gray image back;
* transformer: one denoiser call on a tiny latent with random text of its declared shape;
* text encoder: encode one short prompt;
* LoRA format: ``detect`` on an empty key set;
* slider: strengths at 0 from the descriptor's ``check_options``;
* filter: a benign prompt or a small gray image must come back as an allowing ``Verdict``;
* writer: write an 8x8 gray image into a temporary folder.
* prompt expander: expand a benign prompt (greedy, 64 tokens) into a non-empty string; one
  whose endpoint or weights the user config does not give is skipped, with the reason.
* embedder: embed three small images of different sizes: unit rows of its ``dim``, the same
  row for the same image alone or in a batch (one that needs weights nobody gave is skipped).
* runner: its ``name`` is a string and ``run`` takes ``(job, items, *, session, events)``
  (not run: that would render a job; a plugin's own tests run a job on it).

Parts that need weights (transformer, text encoder, VAE) are checked with the weights of a
registered model preset that ships them (the nano presets do), or with ``location=``;
otherwise they are skipped, with the reason. Torch is imported only when a check runs.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krea2kit.contracts import (
    CONTRACT_VERSION,
    HOST_CALLS,
    LOADS_WEIGHTS,
    LoadContext,
    missing_members,
    protocol_for,
    protocol_members,
)

OK, FAIL, SKIP = "ok", "fail", "skip"
BENIGN_PROMPT = "a red circle on a white background"


@dataclass
class CheckResult:
    """The outcome of one part's check: ``status`` is "ok", "fail" or "skip"."""

    kind: str
    name: str
    plugin: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "plugin": self.plugin, "status": self.status,
                "detail": self.detail}

    def line(self) -> str:
        return f"{self.status:<4} {self.kind} {self.plugin}:{self.name}: {self.detail}"


class _Failed(Exception):
    """One check failed; the message says what and why."""


# --- signatures -------------------------------------------------------------------------------


def signature_problems(part: Any, protocol: Any) -> list[str]:
    """Methods of ``part`` that cannot be called the way the host calls them."""
    _, methods = protocol_members(protocol)
    problems = []
    for name in methods:
        target = part if name == "__call__" else getattr(part, name, None)
        if target is None:
            continue
        positional, keywords = HOST_CALLS[name]
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without a signature: trust it
            continue
        try:
            sig.bind(*([None] * positional), **{k: None for k in keywords})
        except TypeError as exc:
            shown = ", ".join(["_"] * positional + [f"{k}=..." for k in keywords])
            problems.append(f"{name}({shown}) does not bind: {exc}")
    return problems


def load_signature_problem(descriptor: Any) -> str | None:
    """Why ``descriptor.load`` cannot be called as ``load(options, context)``, or ``None``."""
    return descriptor.load_problem()


# --- what a check loads the part with ---------------------------------------------------------


def _default_options(descriptor: Any) -> Any:
    model = descriptor.options_model()
    if model is None:
        return None
    values = dict(getattr(descriptor, "check_options", None) or {})
    try:
        return model.model_validate(values)
    except Exception as exc:
        raise _Failed(f"its options schema {model.__name__} rejects {values or 'an empty table'} ({exc}); "
                      "give the descriptor check_options={...}, a valid example table") from None


def _plugin_options(registry: Any, plugin: str) -> Any:
    if registry is None:
        return None
    for d in registry.all("options"):
        if d.plugin == plugin and d.name == plugin:
            try:
                return d.validate_options({}, where=f"plugins.{plugin}")
            except Exception:
                return None
    return None


def _weights_for(descriptor: Any, registry: Any, settings: Any) -> tuple[str, str, bool] | None:
    """(location, config, borrowed) of the first preset using this part whose weights can be
    found; failing that, the default model's weights for the same role (``borrowed``: a
    wrapper around a built-in part loads them, another architecture may not)."""
    from krea2kit.locate import locate_weights
    from krea2kit.recipe.plan import DEFAULT_MODEL

    if registry is None:
        return None
    role = descriptor.kind
    presets = [p for p in registry.all("model")
               if getattr(p, role) in (descriptor.name, f"{descriptor.plugin}:{descriptor.name}")]
    borrowed = [p for p in registry.all("model") if p.name == DEFAULT_MODEL and p not in presets]
    for preset in presets + borrowed:
        try:
            location, _ = locate_weights(preset, role, None, settings)
        except Exception:
            continue
        return str(location), getattr(preset, f"{role}_config", ""), preset in borrowed
    return None


# --- the tiny calls ---------------------------------------------------------------------------


def _finite(t: Any, what: str) -> None:
    import torch

    if not torch.is_tensor(t):
        raise _Failed(f"{what} is {type(t).__name__}, not a tensor")
    if not torch.isfinite(t.float()).all():
        raise _Failed(f"{what} holds NaN or inf")


def _run_sampler(sampler: Any, descriptor: Any, options: Any) -> str:
    import torch

    target = 0.25  # a constant clean image x0; the exact velocity is v = (x - x0) / sigma
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    calls: list[tuple] = []

    def denoise(xt, sigma):
        s = float(sigma)
        return (xt - target) / max(s, 1e-6)

    def callback(step, total, sigma, latents):
        calls.append((step, total))

    kwargs = options.model_dump() if hasattr(options, "model_dump") else {}
    out = sampler(denoise, x, torch.tensor([1.0, 0.0]), generator=torch.Generator().manual_seed(0),
                  callback=callback, **kwargs)
    _finite(out, "the sampler's result")
    if tuple(out.shape) != tuple(x.shape):
        raise _Failed(f"returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    if calls != [(0, 1)]:
        raise _Failed(f"a 1-step run called back {calls}, expected [(0, 1)] (callback(step, total, sigma, x))")
    err = float((out - target).abs().max())
    if not getattr(descriptor, "stochastic", False) and err > 1e-3:
        raise _Failed(f"one step of the exact velocity ends {err:.3g} away from x0 (expected ~0): check the "
                      "convention x_t = sigma*noise + (1-sigma)*x0, v = noise - x0, sigmas from 1 to 0")
    return "one step of the exact velocity of a constant image lands on it"


def _run_vae(vae: Any, descriptor: Any) -> str:
    import torch

    contract = vae.contract
    if descriptor.contract is not None and (contract.channels, contract.factor) != (
            descriptor.contract.channels, descriptor.contract.factor):
        raise _Failed(f"its contract ({contract.describe()}) differs from the descriptor's "
                      f"({descriptor.contract.describe()})")
    c, f = int(contract.channels), int(contract.factor)
    with torch.inference_mode():
        images = vae.decode(torch.zeros(1, c, 4, 4, dtype=getattr(vae, "dtype", torch.float32),
                                        device=getattr(vae, "device", "cpu")))
        _finite(images, "decode's images")
        if tuple(images.shape) != (1, 3, 4 * f, 4 * f):
            raise _Failed(f"decode of a (1, {c}, 4, 4) latent gave {tuple(images.shape)}, expected (1, 3, {4 * f}, {4 * f})")
        latents = vae.encode(torch.zeros_like(images))
        _finite(latents, "encode's latents")
        if tuple(latents.shape) != (1, c, 4, 4):
            raise _Failed(f"encode of a (1, 3, {4 * f}, {4 * f}) image gave {tuple(latents.shape)}, expected (1, {c}, 4, 4)")
    return f"decode/encode of a 4x4 latent ({contract.describe()})"


def _run_dit(dit: Any) -> str:
    import torch

    p, c = int(dit.patch_size), int(dit.in_channels)
    if dit.text_shape is None:
        return f"patch {p}, {c} channels (no text shape declared: no call made)"
    taps, width = dit.text_shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 4, taps, width, generator=g)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.inference_mode():
        denoise = dit.make_denoiser((hidden, mask), None, guidance=0.0, latent_size=(2 * p, 2 * p))
        x = torch.randn(1, c, 2 * p, 2 * p, generator=g)
        v = denoise(x, 0.5)
    _finite(v, "the velocity")
    if tuple(v.shape) != tuple(x.shape):
        raise _Failed(f"the denoiser returned {tuple(v.shape)} for latents {tuple(x.shape)}")
    return f"one denoiser call on a {2 * p}x{2 * p} latent (patch {p}, {c} channels, text {taps}x{width})"


def _run_text_encoder(encoder: Any) -> str:
    with _no_grad():
        hidden, mask = encoder.encode([BENIGN_PROMPT])
    _finite(hidden, "the hidden states")
    if hidden.ndim != 4 or hidden.shape[0] != 1 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise _Failed(f"encode gave hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)}; expected "
                      "(1, L, taps, D) and (1, L)")
    notes = encoder.take_warnings()
    if not isinstance(notes, list):
        raise _Failed(f"take_warnings() returned {type(notes).__name__}, not a list")
    return f"encoded one prompt: hidden {tuple(hidden.shape)}"


def _no_grad():
    import torch

    return torch.inference_mode()


def _run_lora_format(fmt: Any) -> str:
    found = fmt.detect([], {})
    if not isinstance(found, bool):
        raise _Failed(f"detect([], {{}}) returned {type(found).__name__}, not a bool")
    return f"detect on an empty key set -> {found}"


def _run_slider(slider: Any, context: LoadContext) -> str:
    if slider.name != context.name:
        raise _Failed(f"built for name {context.name!r}, it calls itself {slider.name!r}")
    lo, hi = slider.range
    value = min(max(0.0, lo), hi)
    fns = slider.strength_fns(value)
    unknown = sorted(set(fns) - set(slider.loras))
    if unknown:
        raise _Failed(f"strength_fns gives strengths for {unknown}, which are not among its loras {slider.loras}")
    for lora, fn in fns.items():
        strength = fn(0, 1)
        if not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise _Failed(f"the strength of {lora!r} at step 0 is {strength!r}, not a finite number")
    return f"drives {', '.join(slider.loras) or 'no LoRA'}; strengths at {value:g}"


def _run_filter(flt: Any, target: str) -> str:
    from PIL import Image

    from krea2kit.safety.verdict import Verdict

    verdict = flt.check_prompt(BENIGN_PROMPT) if target == "prompt" else flt.check_image(
        Image.new("RGB", (64, 64), (128, 128, 128)))
    if not isinstance(verdict, Verdict):
        raise _Failed(f"returned {type(verdict).__name__}, not a krea2kit.safety.verdict.Verdict")
    if verdict.action == "block":
        raise _Failed(f"blocked a benign {'prompt' if target == 'prompt' else 'gray image'}: {verdict.detail}")
    what = f"the prompt {BENIGN_PROMPT!r}" if target == "prompt" else "a 64x64 gray image"
    return f"{what} -> {verdict.action}"


def _run_writer(writer: Any) -> str:
    from PIL import Image

    from krea2kit.contracts import OutputInfo
    from krea2kit.output.metadata import ImageMetadata

    ext = writer.extension
    if not isinstance(ext, str) or not ext.startswith("."):
        raise _Failed(f"extension {ext!r} must be a suffix with the dot, e.g. '.png'")
    with tempfile.TemporaryDirectory(prefix="krea2kit-check-") as tmp:
        folder = Path(tmp)
        path = folder / f"check{ext}"
        info = OutputInfo(metadata=ImageMetadata(parameters=BENIGN_PROMPT, krea2kit={}), prompt=BENIGN_PROMPT,
                          negative="", seed=0, index=0)
        written = Path(writer.write(Image.new("RGB", (8, 8), (128, 128, 128)), path, info))
        if not written.is_file() or written.stat().st_size == 0:
            raise _Failed(f"write returned {written}, which is not a written file")
        if written.resolve().parent != folder.resolve():
            raise _Failed(f"asked to write {path.name} in a folder, it wrote {written} elsewhere")
        if written.suffix != ext:
            raise _Failed(f"wrote {written.name}, not a {ext} file")
        leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
        if leftovers:
            raise _Failed(f"left temporary files behind: {', '.join(leftovers)}")
        return f"wrote an 8x8 image as {written.name} ({written.stat().st_size} bytes)"


def _check_images() -> list:
    """Three small RGB images of different sizes and content for an embedder."""
    from PIL import Image, ImageDraw

    flat = Image.new("RGB", (32, 32), (128, 128, 128))
    shape = Image.new("RGB", (48, 40), (255, 255, 255))
    ImageDraw.Draw(shape).ellipse((4, 4, 30, 30), fill=(220, 30, 30))
    stripes = Image.new("RGB", (40, 40), (0, 0, 0))
    draw = ImageDraw.Draw(stripes)
    for x in range(0, 40, 8):
        draw.rectangle((x, 0, x + 3, 39), fill=(30, 60, 220))
    return [flat, shape, stripes]


def _run_embedder(embedder: Any) -> str:
    import torch

    dim = embedder.dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise _Failed(f"dim is {dim!r}, not a positive int")
    if not isinstance(embedder.name, str) or not embedder.name:
        raise _Failed(f"name is {embedder.name!r}, not a non-empty string (it is recorded with the scores)")
    images = _check_images()
    with _no_grad():
        batch = embedder.embed(images)
        alone = embedder.embed(images[1:2])
    _finite(batch, "the embeddings")
    if tuple(batch.shape) != (len(images), dim):
        raise _Failed(f"embed of {len(images)} images gave shape {tuple(batch.shape)}, expected ({len(images)}, {dim})")
    norms = batch.float().norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise _Failed(f"rows are not L2-normalised (lengths {[round(float(n), 4) for n in norms]})")
    _finite(alone, "the embedding of one image")
    err = float((alone.float().reshape(-1) - batch[1].float().reshape(-1)).abs().max()) if alone.numel() == dim else None
    if err is None or err > 1e-3:
        raise _Failed("an image embedded alone differs from the same image in a batch"
                      + (f" (max difference {err:.3g})" if err is not None else f" (shape {tuple(alone.shape)})"))
    return f"embedded 3 small images of different sizes: unit rows of {dim}, batch-independent ({embedder.name})"


def _run_runner(runner: Any) -> str:
    name = getattr(runner, "name", None)
    if not isinstance(name, str) or not name:
        raise _Failed(f"name is {name!r}, not a non-empty string")
    return f"runner {name!r}: run(job, items, *, session, events) is callable (not run here: it renders a job)"


def _expander_weights(registry: Any, settings: Any) -> tuple[str, str, bool] | None:
    """A local expander runs on the language model beside the text encoder: the default model's."""
    from krea2kit.locate import locate_weights
    from krea2kit.recipe.plan import DEFAULT_MODEL

    if registry is None:
        return None
    try:
        location, _ = locate_weights(registry.get("model", DEFAULT_MODEL), "text_encoder", None, settings)
    except Exception:
        return None
    return str(location), "", False


def _run_prompt_expander(expander: Any) -> str:
    identity = getattr(expander, "identity", None)
    if not isinstance(identity, str) or not identity:
        raise _Failed(f"identity is {identity!r}, not a non-empty string (it keys the expansion cache)")
    text = expander.expand(BENIGN_PROMPT, system_prompt="Describe the picture in one sentence.", seed=0,
                           temperature=0.0, max_tokens=64)
    if not isinstance(text, str) or not text.strip():
        raise _Failed(f"expand returned {text!r}, not a non-empty string")
    return f"expanded a benign prompt into {len(text)} characters ({identity})"


def _check_model(preset: Any, registry: Any) -> str:
    if registry is None:
        return "preset (not checked without a registry)"
    from krea2kit.errors import RecipeError

    for role in LOADS_WEIGHTS:
        try:
            registry.get(role, getattr(preset, role))
        except RecipeError as exc:
            raise _Failed(f"its {role} {getattr(preset, role)!r}: {exc.message}") from None
    vae = registry.get("vae", preset.vae)
    contract = vae.contract  # declared by the VAEDescriptor (None: only known once loaded)
    if contract is not None and contract.channels != preset.latent_channels:
        raise _Failed(f"VAE {vae.name!r} gives {contract.describe()}, the preset takes {preset.latent_channels} "
                      "latent channels")
    return f"parts {preset.dit}, {preset.text_encoder}, {preset.vae} are registered and fit"


# --- one part ---------------------------------------------------------------------------------


def check_part(descriptor: Any, *, registry: Any = None, settings: Any = None, location: str | None = None,
               config: str = "", part: Any = None) -> CheckResult:
    """Check one registered part against its protocol; never raises for the part's faults.

    registry: where to find presets with weights and the plugin's options table.
    location, config: weights for a transformer, text encoder or VAE (else a preset's).
    part: an already built part to check instead of loading one (its ``load`` signature is
        still checked), e.g. a filter built around a fake detector in a unit test.
    """
    kind, name, plugin = descriptor.kind, descriptor.name, descriptor.plugin or "?"

    def result(status: str, detail: str) -> CheckResult:
        return CheckResult(kind, name, plugin, status, detail)

    if kind == "model":
        try:
            return result(OK, _check_model(descriptor, registry))
        except _Failed as exc:
            return result(FAIL, str(exc))
    if kind == "options":
        try:
            descriptor.validate_options({}, where=f"plugins.{name}")
            return result(OK, "an empty table validates")
        except Exception as exc:
            return result(OK, f"schema loads; an empty table does not validate ({type(exc).__name__})")
    problem = load_signature_problem(descriptor)
    if problem:
        return result(FAIL, problem)
    try:
        options = _default_options(descriptor)
        context = LoadContext(role=kind, name="check" if kind == "slider" else name, settings=settings,
                              plugin_options=_plugin_options(registry, descriptor.plugin))
        borrowed = False
        if kind == "prompt_expander" and getattr(descriptor, "needs", "") == "weights" and part is None:
            found = (location, config, False) if location else _expander_weights(registry, settings)
            context = LoadContext(role=kind, name=name, location=found[0] if found else "", settings=settings,
                                  plugin_options=context.plugin_options)
        if kind in LOADS_WEIGHTS and part is None:
            found = (location, config, False) if location else _weights_for(descriptor, registry, settings)
            if found is None:
                return result(SKIP, "needs weights: no registered preset ships them (pass location= to check_part)")
            borrowed = found[2]
            context = LoadContext(role=kind, name=name, location=found[0], config=found[1], settings=settings,
                                  plugin_options=context.plugin_options)
        try:
            loaded = part if part is not None else descriptor.load_part(options, context)
        except Exception as exc:
            from krea2kit.errors import Krea2kitError, WeightsError

            if kind == "prompt_expander" and isinstance(exc, Krea2kitError):
                # its endpoint or weights come from the user config, which does not give them
                return result(SKIP, f"not set up here: {getattr(exc, 'message', None) or exc}")

            if kind == "embedder" and getattr(descriptor, "needs_weights", False) and isinstance(exc, WeightsError):
                # the user gave it no weights (it never downloads any): nothing to check
                where = f" (set {exc.key})" if getattr(exc, "key", None) else ""
                return result(SKIP, f"needs weights: {getattr(exc, 'message', None) or exc}{where}")
            if not borrowed:
                raise
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            return result(SKIP, f"no preset names it, and it does not load the default model's {kind} weights "
                                f"({message}); register a preset with its weights or pass location= to check_part")
        protocol = protocol_for(kind, getattr(descriptor, "target", "image"))
        missing = missing_members(loaded, protocol)
        if missing:
            raise _Failed(f"load() returned {type(loaded).__name__}, which lacks {', '.join(missing)} "
                          f"({protocol.__name__})")
        bad = signature_problems(loaded, protocol)
        if bad:
            raise _Failed("; ".join(bad))
        detail = {
            "sampler": lambda: _run_sampler(loaded, descriptor, options),
            "vae": lambda: _run_vae(loaded, descriptor),
            "dit": lambda: _run_dit(loaded),
            "text_encoder": lambda: _run_text_encoder(loaded),
            "lora_format": lambda: _run_lora_format(loaded),
            "slider": lambda: _run_slider(loaded, context),
            "filter": lambda: _run_filter(loaded, getattr(descriptor, "target", "image")),
            "writer": lambda: _run_writer(loaded),
            "prompt_expander": lambda: _run_prompt_expander(loaded),
            "embedder": lambda: _run_embedder(loaded),
            "runner": lambda: _run_runner(loaded),
        }[kind]()
        return result(OK, detail + (" (with the default model's weights)" if borrowed else ""))
    except _Failed as exc:
        return result(FAIL, str(exc))
    except Exception as exc:  # the part's own error: report it, do not crash the report
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return result(FAIL, str(message))


def check_registry(registry: Any, *, plugins: set[str] | None = None, settings: Any = None) -> list[CheckResult]:
    """Check every registered part (of ``plugins`` only, when given), in kind and name order."""
    from krea2kit.registry import HOOK_KINDS
    from krea2kit.settings import Settings

    settings = settings if settings is not None else Settings()  # defaults: no user config
    results = []
    for cls in HOOK_KINDS.values():
        for descriptor in registry.all(cls.kind):
            if plugins is not None and descriptor.plugin not in plugins:
                continue
            results.append(check_part(descriptor, registry=registry, settings=settings))
    return results


def check_plugin(plugin: Any, name: str | None = None, *, settings: Any = None, raise_on_failure: bool = True,
                 allow_skips: bool = True) -> list[CheckResult]:
    """Register ``plugin`` (a module with hook implementations) beside krea2kit's built-ins
    and check every part it registers. With ``raise_on_failure`` (the default) a failing
    part is an ``AssertionError`` listing each failure, for use in a plugin's test suite."""
    from krea2kit.plugins import Host

    name = name or getattr(plugin, "__name__", "plugin")
    host = Host(load_entry_points=False, extra_plugins=((plugin, name),))
    if name not in host.plugins:
        raise AssertionError(f"plugin {name!r} did not register: " + "; ".join(host.problems))
    results = check_registry(host.registry, plugins={name}, settings=settings)
    failed = [r for r in results if r.status == FAIL or (not allow_skips and r.status == SKIP)]
    if raise_on_failure and failed:
        raise AssertionError(f"{len(failed)} part(s) of {name!r} break krea2kit plugin contract "
                             f"{CONTRACT_VERSION}:\n" + "\n".join(r.line() for r in failed))
    return results


__all__ = ["CheckResult", "check_part", "check_plugin", "check_registry", "load_signature_problem",
           "signature_problems"]
