"""The built-in content filters as parts, with the options a recipe may set.

A recipe may only make filtering stricter: add prompt terms, lower the image
threshold. Loosening is a deployer decision made in the user config
(``[safety]``), never in a recipe.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from krea2kit.contracts import LoadContext


# Strict like the recipe's own tables: TOML has real booleans, numbers, strings, arrays and
# tables, so nothing is coerced (``threshold = true`` is not 1.0, ``"0.5"`` is not 0.5), and
# a threshold is a finite number.
_STRICT_OPTIONS = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PromptRulesOptions(BaseModel):
    model_config = _STRICT_OPTIONS

    extra_terms: dict[str, list[str]] = Field(
        default_factory=dict, description="More terms per list (e.g. {sexual_explicit = [\"...\"]}): stricter only")

    @field_validator("extra_terms")
    @classmethod
    def _stricter_only(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        loosening = sorted(k for k in value if k.replace("-", "_").lower() in {"allow", "allow_phrases", "allowlist"})
        if loosening:
            raise ValueError("a recipe may only add blocking terms; allow-lists are a deployer setting")
        return value


class NsfwImageOptions(BaseModel):
    model_config = _STRICT_OPTIONS

    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Block at or above this NSFW score; a recipe may only lower it")

    @field_validator("threshold")
    @classmethod
    def _lower_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        # The deployer's ceiling arrives in the validation context at plan time, so
        # `recipe check` and `run --dry-run` refuse a loosening recipe too.
        settings = (info.context or {}).get("settings")
        ceiling = image_threshold_ceiling(settings)
        if value is not None and value > ceiling:
            raise ValueError(f"a recipe may only lower the NSFW threshold (deployer value {ceiling}); "
                             "raising it is a deployer decision: safety.image_threshold in the user config")
        return value


def image_threshold_ceiling(settings: Any) -> float:
    """The highest NSFW threshold a recipe may ask for: the deployer's, else the default."""
    from krea2kit.safety.image_filter import DEFAULT_BLOCK_THRESHOLD

    if settings is not None and settings.safety.image_threshold is not None:
        return settings.safety.image_threshold
    return DEFAULT_BLOCK_THRESHOLD


def prompt_rules(options: PromptRulesOptions | None, context: LoadContext) -> Any:
    from krea2kit.safety.prompt_filter import from_config

    config: dict[str, Any] = {}
    if options is not None and options.extra_terms:
        config["extra_terms"] = options.extra_terms
    return from_config(config)


def nsfw_image(options: NsfwImageOptions | None, context: LoadContext) -> Any:
    from krea2kit.errors import RecipeError
    from krea2kit.safety.image_filter import from_config

    ceiling = image_threshold_ceiling(context.settings)
    threshold = ceiling
    if options is not None and options.threshold is not None:
        if options.threshold > ceiling:
            raise RecipeError(
                f"a recipe may only lower the NSFW threshold (deployer value {ceiling}), got {options.threshold}",
                key="safety.settings.nsfw-image.threshold",
                hint="raising it is a deployer decision: set safety.image_threshold in the user config",
            )
        threshold = options.threshold
    return from_config({"threshold": threshold})
