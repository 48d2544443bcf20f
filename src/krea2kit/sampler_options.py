"""The built-in samplers' table and options schemas (torch-free, for registration and
recipe validation; the functions are in :mod:`krea2kit.sampling`)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class EulerOptions(BaseModel):
    """``euler`` takes no options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HeunOptions(BaseModel):
    """``heun`` takes no options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AncestralOptions(BaseModel):
    """Options of ``euler_ancestral`` (names and defaults as in ComfyUI's sampler)."""

    # Strict like the recipe schema: eta = "0.5" or true is an error, nan/inf are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    eta: float = Field(1.0, ge=0.0, le=1.0, description=(
        "how much of each step is re-noised: 0 is the deterministic Euler ODE step, 1 steps "
        "down to sigma_next^2 / sigma and adds the rest back as fresh noise"))
    s_noise: float = Field(1.0, ge=0.0, description="scale of the fresh noise")


@dataclass(frozen=True)
class BuiltinSampler:
    """One row of the built-in sampler table: ``builtins`` registers each row, and
    ``sampling.SAMPLERS`` holds the function of the same name."""

    name: str
    summary: str
    options: type[BaseModel]
    stochastic: bool = False


#: The one table of built-in samplers (torch-free, so registering them imports nothing heavy).
BUILTIN_SAMPLERS: tuple[BuiltinSampler, ...] = (
    BuiltinSampler("euler", "Euler flow matching, the official Krea 2 sampler", EulerOptions),
    BuiltinSampler("heun", "Heun's 2nd-order method (Karras et al. 2022), 2 model calls per step", HeunOptions),
    BuiltinSampler("euler_ancestral", "Stochastic rectified-flow Euler ancestral (eta, s_noise)", AncestralOptions,
                   stochastic=True),
)
