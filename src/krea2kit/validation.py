"""Turning validation failures into one clear message: file, dotted key, expectation."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from krea2kit.errors import RecipeError


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dotted(loc: Iterable[Any], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def file_for(key: str, provenance: Mapping[str, str] | None, default: str | None) -> str | None:
    """The file that set ``key`` (or its closest ancestor)."""
    if not provenance:
        return default
    probe = key
    while probe:
        if probe in provenance:
            return provenance[probe]
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    return default


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """Field names allowed at ``loc`` (best effort, for did-you-mean)."""
    import typing

    current = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        # unwrap Optional[...] / list[...] / dict[str, ...]
        for _ in range(3):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if getattr(ann, "model_fields", None) is not None or not args:
                break
            ann = args[-1]
        current = ann
    fields = getattr(current, "model_fields", None) or {}
    return [f.alias or name for name, f in fields.items()]


def validate_model(model: Any, data: Mapping, *, file: str | None = None, prefix: str = "",
                   provenance: Mapping[str, str] | None = None, context: Mapping[str, Any] | None = None) -> Any:
    """Validate ``data`` with a pydantic ``model``; raise :class:`RecipeError` on the first problem.

    ``context`` reaches the model's validators as pydantic's ``info.context`` (the host passes
    ``{"settings": Settings}`` for part options, so a part can refuse at plan time a value
    only the deployer may set)."""
    import pydantic

    try:
        return model.model_validate(data, context=dict(context) if context else None)
    except pydantic.ValidationError as exc:
        raise recipe_error_from(exc, model, file=file, prefix=prefix, provenance=provenance) from None


# Pydantic adds the member's type to the location of an error inside a union
# (``sampler.mu.float``, ``model.weights.dit.EnvRef``); a person wants the key alone.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|bytes|(literal|list|dict|tuple|set|"
                        r"function-(after|before|wrap|plain)|constrained-\w+)\[.*\]|[A-Z][A-Za-z0-9]*)$")


def _key_loc(loc: tuple) -> tuple:
    """``loc`` without the union-member tags pydantic puts into it (recipe keys are lowercase)."""
    return tuple(part for i, part in enumerate(loc)
                 if isinstance(part, int) or i == 0 or not _UNION_TAG.match(str(part)))


# A wrong value is quoted back, but a long one only in part.
MAX_QUOTED_VALUE = 80


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_VALUE else text[:MAX_QUOTED_VALUE - 3] + "..."


def recipe_error_from(exc: Any, model: Any, *, file: str | None, prefix: str = "",
                      provenance: Mapping[str, str] | None = None) -> RecipeError:
    errors = exc.errors(include_url=False)
    # Unknown keys first: they often explain the other errors.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = _key_loc(tuple(first["loc"]))
    # A union reports one error per member for the same key: count problems by key.
    errors = list({_key_loc(tuple(e["loc"])): e for e in reversed(errors)}.values())
    key = dotted(loc, prefix)
    where = file_for(key, provenance, file)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        name = str(loc[-1])
        return RecipeError(
            f"unknown key{did_you_mean(name, allowed)}{more}",
            file=where, key=key,
            hint=f"allowed here: {', '.join(sorted(allowed))}" if allowed else None,
        )
    if first["type"] == "missing":
        return RecipeError(f"required key is missing{more}", file=where, key=key)
    got = first.get("input")
    got_text = "" if isinstance(got, (dict, list)) else f", got {_short_repr(got)}"
    msg = first["msg"]
    if first.get("type") in ("value_error", "assertion_error"):  # our own validators' words
        msg = msg.split(", ", 1)[-1]  # without pydantic's "Value error, " prefix
    msg = msg[0].lower() + msg[1:] if msg else msg
    return RecipeError(f"{msg}{got_text}{more}", file=where, key=key)
