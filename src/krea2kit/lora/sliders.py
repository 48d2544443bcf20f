"""Generative sliders: a signed value that drives the strength of one or more LoRAs.

A Concept Slider is an ordinary LoRA applied with a signed multiplier; negative values push
the opposite way (Concept Sliders, Gandikota et al. 2023, arXiv 2311.12092). Typical ranges
are about ±5 (the FLUX sliders of ``rohitgandikota/sliders`` sweep -5..5). That code keeps
the slider off during the first part of sampling to preserve composition (``start_noise``),
hence the optional ``start_step``.

A :class:`Slider` of kind ``"lora"`` (the ``[[sliders]]`` kind) binds one or more LoRAs, each with its own
value -> strength mapping (a gain, or piecewise-linear points), and yields per-LoRA
strength functions ``fn(step, total)`` for :func:`krea2kit.lora.apply.attach_adapters`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Annotated, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from krea2kit.errors import UsageError
from krea2kit.lora.apply import StepSchedule, StrengthFn

#: The one name of this slider kind: registered under it (builtins) and written in recipes.
SLIDER_KIND = "lora"
SLIDER_KINDS = (SLIDER_KIND,)
#: default slider range (ai-toolkit's ``train_slider.example.yml`` samples at -5..5).
DEFAULT_RANGE = (-5.0, 5.0)


# Slider options are strict like the recipe's tables (``gain = true`` or ``start_step = "2"``
# is an error, not 1.0 or 2), field by field: a model-wide strict mode would also refuse the
# TOML arrays that give the (min, max) and (value, strength) pairs, since strict tuples take
# only tuples. An integer is still a valid float (pydantic's strict floats accept ints).
_Float = Annotated[float, Strict()]
_Int = Annotated[int, Strict()]
_Str = Annotated[str, Strict()]
_Pair = tuple[_Float, _Float]
_OPTIONS = ConfigDict(extra="forbid", allow_inf_nan=False)


class Binding(BaseModel):
    model_config = _OPTIONS

    lora: _Str
    gain: _Float = 1.0
    points: list[_Pair] | None = Field(
        None, description="piecewise-linear [value, strength] pairs instead of gain x value")


class LoraSliderOptions(BaseModel):
    """``[[sliders]]`` keys of kind "lora" (besides name, value, kind)."""

    model_config = _OPTIONS

    lora: _Str | None = Field(None, description="The [[loras]] name this slider drives")
    loras: list[_Str | Binding] | None = Field(None, description="Several LoRAs, each with its own gain or points")
    gain: _Float = 1.0
    points: list[_Pair] | None = None
    range: _Pair = (-5.0, 5.0)
    default: _Float = 0.0
    start_step: _Int = Field(0, ge=0, description="Apply only from this step on (keeps composition, as Concept Sliders do)")
    end_step: _Int | None = Field(None, ge=1)
    description: _Str = ""

    @model_validator(mode="after")
    def _bound(self):
        if (self.lora is None) == (self.loras is None):
            raise ValueError("needs 'lora' or 'loras' (exactly one)")
        if self.range[0] >= self.range[1]:
            raise ValueError("range = [min, max] needs min < max")
        return self

    def bound_loras(self) -> list[str]:
        if self.lora is not None:
            return [self.lora]
        return [b if isinstance(b, str) else b.lora for b in self.loras or []]


@dataclass(frozen=True)
class SliderBinding:
    """One LoRA driven by a slider.

    ``lora``: the key of the LoRA (a name or path, matched by the caller).
    ``gain``: strength = gain * value (the default mapping; negative gains invert).
    ``points``: optional piecewise-linear mapping ``[(value, strength), ...]`` (sorted by
    value, extrapolated linearly beyond the ends); replaces ``gain``.
    """

    lora: str
    gain: float = 1.0
    points: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.points is not None:
            pts = tuple(sorted((float(v), float(s)) for v, s in self.points))
            if len(pts) < 2 or len({v for v, _ in pts}) != len(pts):
                raise UsageError(f"slider mapping for {self.lora!r} needs at least two points with distinct values")
            object.__setattr__(self, "points", pts)

    def strength(self, value: float) -> float:
        if self.points is None:
            return self.gain * value
        xs = [v for v, _ in self.points]
        i = min(max(bisect.bisect_right(xs, value) - 1, 0), len(xs) - 2)
        (x0, y0), (x1, y1) = self.points[i], self.points[i + 1]
        return y0 + (y1 - y0) * (value - x0) / (x1 - x0)


@dataclass(frozen=True)
class Slider:
    """A named control: ``value`` in ``range`` -> a strength for each bound LoRA.

    ``start_step``/``end_step``: the slider acts on steps ``[start_step, end_step)`` only
    (``None`` = to the end); before that the LoRAs are off (strength 0), which keeps the
    composition of the un-slid image.
    """

    name: str
    bindings: tuple[SliderBinding, ...]
    range: tuple[float, float] = DEFAULT_RANGE
    default: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    kind: str = SLIDER_KIND
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SLIDER_KINDS:
            raise UsageError(f"unknown slider kind {self.kind!r} (known: {', '.join(SLIDER_KINDS)})")
        lo, hi = float(self.range[0]), float(self.range[1])
        if not lo < hi:
            raise UsageError(f"slider {self.name!r}: range {self.range} is empty")
        object.__setattr__(self, "range", (lo, hi))
        if not self.bindings:
            raise UsageError(f"slider {self.name!r} binds no LoRA")
        self.check(self.default)

    @property
    def loras(self) -> tuple[str, ...]:
        """The LoRA names this slider drives, in binding order (one each)."""
        return tuple(dict.fromkeys(b.lora for b in self.bindings))

    def check(self, value: float) -> float:
        lo, hi = self.range
        if not lo <= value <= hi:
            raise UsageError(f"slider {self.name!r}: value {value:g} is outside its range [{lo:g}, {hi:g}]")
        return float(value)

    def strengths(self, value: float | None = None) -> dict[str, float]:
        """Strength per bound LoRA at ``value`` (``None``: the default)."""
        v = self.check(self.default if value is None else value)
        out: dict[str, float] = {}
        for b in self.bindings:
            out[b.lora] = out.get(b.lora, 0.0) + b.strength(v)
        return out

    def strength_fns(self, value: float | None = None) -> dict[str, StrengthFn]:
        """``{lora: fn(step, total)}`` honouring ``start_step``/``end_step``."""
        return {k: StepSchedule(s, self.start_step, self.end_step) for k, s in self.strengths(value).items()}

    @classmethod
    def from_dict(cls, name: str, data: Mapping) -> "Slider":
        """From a recipe table, e.g. ``{lora = "age.safetensors", range = [-5, 5], default = 0,
        start_step = 1}`` or ``{loras = [{lora = "a", gain = 1}, {lora = "b", points = [[-1, -0.5], [1, 2]]}]}``,
        validated by the one schema of the kind, :class:`LoraSliderOptions`."""
        from pydantic import ValidationError

        table = dict(data)
        kind = str(table.pop("kind", SLIDER_KIND))
        extra = set(table) - set(LoraSliderOptions.model_fields)
        if extra:
            raise UsageError(f"slider {name!r}: unknown fields {', '.join(sorted(extra))}")
        try:
            options = LoraSliderOptions.model_validate(table)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise UsageError(f"slider {name!r}: {where + ': ' if where else ''}{first['msg']}") from None
        return cls.from_options(name, options, kind=kind)

    @classmethod
    def from_options(cls, name: str, options, *, kind: str | None = None) -> "Slider":
        """From validated :class:`LoraSliderOptions` (a ``[[sliders]]``
        entry of kind "lora")."""
        items = options.loras if options.loras is not None else [
            {"lora": options.lora, "gain": options.gain, "points": options.points}]
        bindings = []
        for it in items:
            it = {"lora": it} if isinstance(it, str) else (it if isinstance(it, dict) else it.model_dump())
            pts = it.get("points")
            bindings.append(SliderBinding(str(it["lora"]), float(it.get("gain", 1.0)),
                                          tuple(tuple(p) for p in pts) if pts is not None else None))
        return cls(name=name, bindings=tuple(bindings), range=tuple(options.range), default=float(options.default),
                   start_step=options.start_step, end_step=options.end_step, kind=kind or SLIDER_KIND,
                   description=options.description)


@dataclass
class _SumFn:
    """Several schedules on one LoRA (a plain strength plus sliders) add up."""

    parts: list = field(default_factory=list)

    def __call__(self, step: int, total: int) -> float:
        return float(sum(p(step, total) for p in self.parts))


def combine_strengths(
    base: Mapping[str, "float | StrengthFn"] | None = None,
    sliders: Sequence[tuple[Slider, float | None]] = (),
) -> dict[str, StrengthFn]:
    """Merge fixed LoRA strengths and slider settings into one ``fn(step, total)`` per LoRA key.

    ``base``: ``{lora: strength or fn}`` for LoRAs used directly; ``sliders``:
    ``[(slider, value or None for its default)]``. The same LoRA may appear in several places;
    its strengths add.
    """
    out: dict[str, _SumFn] = {}
    for key, spec in (base or {}).items():
        out.setdefault(key, _SumFn()).parts.append(spec if callable(spec) else StepSchedule(float(spec)))
    for slider, value in sliders:
        for key, fn in slider.strength_fns(value).items():
            out.setdefault(key, _SumFn()).parts.append(fn)
    return dict(out)
