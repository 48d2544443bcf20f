"""``[expander]`` at plan time: which prompts are expanded, the backend is registered, the
system prompt file is readable, and what an image's one-image recipe records about it.
The expansion itself runs in :mod:`krea2kit.expander.jobs` (a layer above recipes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from krea2kit.errors import RecipeError
from krea2kit.recipe.schema import ExpanderSection

#: A system prompt is a page of instructions; anything bigger is not one.
MAX_SYSTEM_PROMPT_BYTES = 64 << 10


def section(recipe: Any) -> ExpanderSection:
    """The recipe's ``[expander]`` (its defaults when the table is absent)."""
    return recipe.expander if recipe.expander is not None else ExpanderSection()


def _entries(recipe: Any) -> list[Any]:
    """Prompt entries in job order (planning puts the single ``prompt`` first); None = ``prompt``."""
    return ([None] if recipe.prompt is not None else []) + list(recipe.prompts)


def wanted(recipe: Any, prompt_index: int) -> bool:
    """Whether the prompt entry at ``prompt_index`` is expanded: its own ``expand``, else
    ``expander.enabled``."""
    entries = _entries(recipe)
    entry = entries[prompt_index] if 0 <= prompt_index < len(entries) else None
    own = getattr(entry, "expand", None)
    return own if own is not None else section(recipe).enabled


def active(plan: Any) -> bool:
    return any(wanted(plan.recipe, job.prompt_index) for job in plan.jobs)


def read_system_prompt(path: str, *, file: str | None = None) -> str:
    """The text of a system prompt file: a regular UTF-8 file of at most 64 KiB, not empty;
    else a RecipeError naming ``expander.system_prompt``."""
    from krea2kit.tomlfiles import FileTooLarge, NotARegularFile, read_text_file

    p = Path(path).expanduser()
    key = "expander.system_prompt"
    fix = ("give a small UTF-8 text file (relative paths start in the current folder), or remove the key "
           "for krea2kit's own system prompt")
    try:
        text = read_text_file(p, limit=MAX_SYSTEM_PROMPT_BYTES)
    except FileNotFoundError:
        raise RecipeError(f"system prompt file not found: {p}", file=file, key=key, hint=fix) from None
    except NotARegularFile as exc:
        raise RecipeError(f"the system prompt {p} is {exc.kind}, not a text file", file=file, key=key,
                          hint=fix) from None
    except FileTooLarge as exc:
        raise RecipeError(f"the system prompt {p} is {exc.size} bytes; at most {MAX_SYSTEM_PROMPT_BYTES} are read",
                          file=file, key=key, hint=fix) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"the system prompt {p} is not UTF-8 text (byte {exc.start})", file=file, key=key,
                          hint=fix) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the system prompt {p}: {exc.strerror or exc}", file=file, key=key,
                          hint=fix) from None
    if not text.strip():
        raise RecipeError(f"the system prompt {p} is empty", file=file, key=key, hint=fix)
    return text.strip()


def check_plan(plan: Any, registry: Any) -> None:
    """Plan time: the backend is registered and the system prompt file is readable."""
    if plan.recipe.expander is None and not active(plan):
        return
    ex = section(plan.recipe)
    f = plan.loaded.file_of
    registry.get("prompt_expander", ex.backend, key="expander.backend", file=f("expander.backend"))
    if active(plan) and ex.system_prompt is not None:
        read_system_prompt(ex.system_prompt, file=f("expander.system_prompt"))


def image_recipe_fields(data: dict[str, Any], job: Any) -> None:
    """An image's one-image recipe records the prompt as written and whether it was expanded
    (its ``[expander]`` on or off for this prompt), so ``run IMAGE.png`` expands it the same way
    and finds the expansion the image records (no model call)."""
    if job.expansion is not None:
        data["prompt"] = job.expansion["original"]
    table = data.get("expander") if isinstance(data.get("expander"), dict) else \
        ExpanderSection().model_dump(mode="json")
    if table.get("system_prompt"):  # a local file: its name only, never the folder (and an image never names one)
        table = {**table, "system_prompt": Path(str(table["system_prompt"])).name}
    data["expander"] = {**table, "enabled": job.expansion is not None}
