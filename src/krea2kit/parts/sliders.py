"""The built-in slider kind: a named control driving one or more [[loras]] strengths."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from krea2kit.contracts import LoadContext


class Binding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora: str
    gain: float = 1.0
    points: list[tuple[float, float]] | None = Field(
        None, description="piecewise-linear [value, strength] pairs instead of gain x value")


class LoraSliderOptions(BaseModel):
    """``[[sliders]]`` keys of kind "lora" (besides name, value, kind)."""

    model_config = ConfigDict(extra="forbid")

    lora: str | None = Field(None, description="The [[loras]] name this slider drives")
    loras: list[str | Binding] | None = Field(None, description="Several LoRAs, each with its own gain or points")
    gain: float = 1.0
    points: list[tuple[float, float]] | None = None
    range: tuple[float, float] = (-5.0, 5.0)
    default: float = 0.0
    start_step: int = Field(0, ge=0, description="Apply only from this step on (keeps composition, as Concept Sliders do)")
    end_step: int | None = Field(None, ge=1)
    description: str = ""

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


def load(options: LoraSliderOptions, context: LoadContext):
    """The :class:`krea2kit.contracts.Slider` of one ``[[sliders]]`` entry: ``context.name``
    is its name, ``options`` its validated keys."""
    from krea2kit.adapters.sliders import Slider

    if options is None:
        raise ValueError(f"slider {context.name!r} needs its options (give 'lora' or 'loras')")
    return Slider.from_options(context.name, options)
