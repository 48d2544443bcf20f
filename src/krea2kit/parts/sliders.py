"""The built-in slider kind: a named control driving one or more [[loras]] strengths."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
            raise ValueError("give exactly one of 'lora' or 'loras'")
        if self.range[0] >= self.range[1]:
            raise ValueError("range = [min, max] needs min < max")
        return self

    def bound_loras(self) -> list[str]:
        if self.lora is not None:
            return [self.lora]
        return [b if isinstance(b, str) else b.lora for b in self.loras or []]

    def to_table(self) -> dict:
        return self.model_dump(exclude_none=True)


def load(options: LoraSliderOptions | None = None):
    """Return a factory ``(name, options) -> adapters.sliders.Slider``."""
    from krea2kit.adapters.sliders import Slider

    def build(name: str, opts: LoraSliderOptions):
        return Slider.from_dict(name, opts.to_table())

    return build
