"""``[matrix]``: one recipe rendered for every combination of a few values.

The axes, in this order (the last one changes fastest, as in :func:`itertools.product`):
prompt fragments (``[matrix.prompt] color = ["red", "blue"]`` fills ``{matrix.color}`` in
``prompt``, ``negative`` and ``[[prompts]]`` texts and negatives, in table order), ``seed``,
``guidance``, ``steps``, LoRA strengths (``[matrix.lora] style = [0.0, 1.0]``, by ``[[loras]]``
name) and slider values (``[matrix.slider] detail = [-1.0, 1.0]``, by ``[[sliders]]`` name).

Each combination is a *cell*: a copy of the recipe with those values set and no ``[matrix]``
left, planned on its own like any recipe, so every image records the plain recipe that
makes it again. Everything is checked here, before any cell is planned: the table itself,
placeholders naming no fragment (and fragments no placeholder uses), LoRA and slider names.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from krea2kit.errors import RecipeError
from krea2kit.recipe.loader import LoadedRecipe
from krea2kit.validation import did_you_mean, validate_model

PLACEHOLDER = re.compile(r"\{matrix\.([^{}]*)\}")
# The most images one matrix may plan (cells x images per cell), like ``count``'s bound.
MAX_IMAGES = 10000


@dataclass
class Axis:
    key: str  # dotted, as in the recipe: "prompt.color", "seed", "lora.style"
    values: list[Any]

    @property
    def short(self) -> str:
        """The label on a contact sheet: the last part of the key."""
        return self.key.rsplit(".", 1)[-1]


@dataclass
class Cell:
    index: int
    values: dict[str, Any]  # axis key -> value, in axis order
    loaded: LoadedRecipe = field(repr=False)

    def label(self, axes: list[Axis] | None = None) -> str:
        keys = [a.key for a in axes] if axes is not None else list(self.values)
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(self.values[k])}" for k in keys)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _texts(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, text) of every prompt and negative a placeholder may sit in."""
    out = [(k, data[k]) for k in ("prompt", "negative") if isinstance(data.get(k), str)]
    for i, entry in enumerate(data.get("prompts") or []):
        if isinstance(entry, dict):
            out += [(f"prompts[{i}].{k}", entry[k]) for k in ("text", "negative") if isinstance(entry.get(k), str)]
    return out


def _entry_names(data: dict[str, Any], table: str) -> list[str]:
    names = []
    for entry in data.get(table) or []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        if name is None and table == "loras" and isinstance(entry.get("path"), str):
            name = PurePath(entry["path"]).stem  # the default name, as planning gives it
        names.append(name)
    return names


def axes_of(loaded: LoadedRecipe) -> list[Axis] | None:
    """The recipe's matrix axes, checked; None without a ``[matrix]`` table."""
    from krea2kit.recipe.schema import MatrixSection

    raw = loaded.data.get("matrix")
    if raw is None:
        return None
    where = loaded.file_of("matrix")
    if not isinstance(raw, dict):
        raise RecipeError("[matrix] must be a table", file=where, key="matrix")
    m = validate_model(MatrixSection, raw, file=where, prefix="matrix", provenance=loaded.provenance)
    fragments = list(m.prompt)
    used: set[str] = set()
    for key, text in _texts(loaded.data):
        for name in PLACEHOLDER.findall(text):
            if name not in m.prompt:
                raise RecipeError(
                    f"{{matrix.{name}}} names no [matrix.prompt] fragment" + did_you_mean(name, fragments),
                    file=loaded.file_of(key.split("[")[0]), key=key,
                    hint=f"fragments: {', '.join(fragments) or 'none'}; add [matrix.prompt] {name or 'NAME'} = [...]")
            used.add(name)
    for name in fragments:
        if name not in used:
            raise RecipeError(f"fragment {name!r} is used by no prompt", file=where, key=f"matrix.prompt.{name}",
                              hint=f"write {{matrix.{name}}} where it goes in prompt (or negative)")
    axes = [Axis(f"prompt.{n}", v) for n, v in m.prompt.items()]
    axes += [Axis(k, getattr(m, k)) for k in ("seed", "guidance", "steps") if getattr(m, k) is not None]
    for table, section in (("loras", m.lora), ("sliders", m.slider)):
        names = _entry_names(loaded.data, table)
        for name, values in section.items():
            if name not in names:
                raise RecipeError(
                    f"no [[{table}]] entry named {name!r}" + did_you_mean(name, [n for n in names if n]),
                    file=where, key=f"matrix.{table[:-1]}.{name}",
                    hint=f"[[{table}]] names: {', '.join(n for n in names if n) or 'none'}")
            axes.append(Axis(f"{table[:-1]}.{name}", values))
    if not axes:
        raise RecipeError("[matrix] has no axis", file=where, key="matrix",
                          hint="give at least one of prompt, seed, guidance, steps, lora, slider")
    cells = 1
    for axis in axes:
        cells *= len(axis.values)
    if cells > MAX_IMAGES:
        raise RecipeError(f"[matrix] makes {cells} combinations, more than {MAX_IMAGES}", file=where, key="matrix",
                          hint="use fewer values per axis")
    return axes


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    kind, _, name = key.partition(".")
    if kind == "prompt":
        token = f"{{matrix.{name}}}"
        for k in ("prompt", "negative"):
            if isinstance(data.get(k), str):
                data[k] = data[k].replace(token, value)
        for entry in data.get("prompts") or []:
            for k in ("text", "negative"):
                if isinstance(entry, dict) and isinstance(entry.get(k), str):
                    entry[k] = entry[k].replace(token, value)
    elif kind == "seed":  # every image's seed: the recipe's and each prompt entry's own
        data["seed"] = value
        for entry in data.get("prompts") or []:
            if isinstance(entry, dict) and "seed" in entry:
                entry["seed"] = value
    elif kind in ("guidance", "steps"):
        data.setdefault("sampler", {})[kind] = value
    else:  # lora / slider by name
        table = "loras" if kind == "lora" else "sliders"
        i = _entry_names(data, table).index(name)
        data[table][i]["strength" if kind == "lora" else "value"] = value


def expand(loaded: LoadedRecipe) -> tuple[list[Axis], list[Cell]] | None:
    """The axes and one :class:`Cell` per combination; None without ``[matrix]``."""
    axes = axes_of(loaded)
    if axes is None:
        return None
    cells = []
    for i, combo in enumerate(itertools.product(*(a.values for a in axes))):
        cell = copy.deepcopy(loaded)
        cell.data.pop("matrix")
        for axis, value in zip(axes, combo):
            _apply(cell.data, axis.key, value)
        cells.append(Cell(i, {a.key: v for a, v in zip(axes, combo)}, cell))
    return axes, cells
