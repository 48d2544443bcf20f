"""The system prompt an expander is given: krea2kit's own (``system_prompt.txt``) or the
local user's file (``[expander] system_prompt = FILE``, e.g. a copy of Krea's
``docs/expansion.txt``). An image's embedded recipe never names one (recipe/trust.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BUILTIN_NAME = "krea2kit"


@dataclass(frozen=True)
class SystemPrompt:
    text: str
    name: str  # "krea2kit" for the built-in, else the file's name (never its folder)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin() -> SystemPrompt:
    text = resources.files("krea2kit.expander").joinpath("system_prompt.txt").read_text(encoding="utf-8")
    return SystemPrompt(text.strip(), BUILTIN_NAME)


def load_system_prompt(path: str | None, *, file: str | None = None) -> SystemPrompt:
    """The built-in prompt (``path`` None) or the text of ``path`` (checked by
    :func:`krea2kit.recipe.expander.read_system_prompt`: a RecipeError naming the key)."""
    if path is None:
        return builtin()
    from krea2kit.recipe.expander import read_system_prompt

    return SystemPrompt(read_system_prompt(path, file=file), Path(path).name)
