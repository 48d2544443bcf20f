"""Options schemas of the built-in samplers (torch-free, for recipe validation)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EulerOptions(BaseModel):
    """``euler`` takes no options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HeunOptions(BaseModel):
    """``heun`` takes no options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AncestralOptions(BaseModel):
    """Options of ``euler_ancestral`` (names and defaults as in ComfyUI's sampler)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: float = Field(1.0, ge=0.0, le=1.0, description=(
        "how much of each step is re-noised: 0 is the deterministic Euler ODE step, 1 steps "
        "down to sigma_next^2 / sigma and adds the rest back as fresh noise"))
    s_noise: float = Field(1.0, ge=0.0, description="scale of the fresh noise")
