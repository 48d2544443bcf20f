"""Attaching a recipe's [[loras]] and [[sliders]] to the transformer as runtime adapters.

Base weights stay untouched; each LoRA's strength is a function of the sampler step
(step ranges, slider start steps). A LoRA bound to a slider is driven by its sliders
alone; its own ``strength`` then multiplies what the sliders give.
"""

from __future__ import annotations

from typing import Any

from krea2kit.recipe.plan import Plan


class _Scaled:
    def __init__(self, fn, factor: float) -> None:
        self.fn, self.factor = fn, factor

    def __call__(self, step: int, total: int) -> float:
        return self.factor * self.fn(step, total)


def lora_strengths(plan: Plan) -> dict[str, Any]:
    """``{lora name: fn(step, total)}`` for every [[loras]] entry, sliders applied."""
    from krea2kit.lora.apply import StepSchedule
    from krea2kit.lora.sliders import combine_strengths

    sliders = []
    bound: set[str] = set()
    for entry, _kind, slider in plan.slider_parts:  # built by the plan
        sliders.append((slider, entry.value))
        bound.update(slider.loras)
    base = {}
    for lora in plan.recipe.loras:
        if lora.name in bound:
            continue
        start, end = lora.steps if lora.steps else (0, None)
        base[lora.name] = StepSchedule(lora.strength, start, end)
    combined = combine_strengths(base, sliders)
    for lora in plan.recipe.loras:
        if lora.name in bound and lora.strength != 1.0:
            combined[lora.name] = _Scaled(combined[lora.name], lora.strength)
    return combined


def attach_recipe_loras(plan: Plan, dit: Any, *, events) -> Any:
    from krea2kit.lora.apply import attach_adapters
    from krea2kit.parts.lora_formats import open_lora

    strengths = lora_strengths(plan)
    pairs = []
    for entry in plan.recipe.loras:
        lora = open_lora(entry.path, plan.lora_formats, strict=entry.strict, name=entry.name)
        if lora.unmatched:
            shown = ", ".join(sorted(lora.unmatched)[:4])
            events("warning", message=f"LoRA {entry.name!r}: {len(lora.unmatched)} key(s) match no module and were "
                                      f"ignored ({shown}); set strict = true to make this an error")
        if lora.base_model:
            events("filter_note", message=f"LoRA {entry.name!r} names base model {lora.base_model!r} (not enforced)")
        pairs.append((lora, strengths.get(entry.name, 0.0)))
    return attach_adapters(dit.module, pairs)
