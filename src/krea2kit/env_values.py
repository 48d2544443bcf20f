"""Values taken from environment variables never appear in messages; the variable's name does.

An environment variable may hold something private (a path under a user or project name, a
mount with a token in it). Wherever krea2kit reads a location from one (``$OSS_TURBO``, a
recipe's ``{env = "VAR"}``, ``$KREA2KIT_CONFIG``, ``$KREA2KIT_CACHE_DIR``) it calls
:func:`from_env` or :func:`remember`, and everything said to a person passes through
:func:`hide`, which writes ``$VAR`` in place of the value (and of the forms a message may
show it in: ``~`` expanded, made absolute).

Torch-free and tiny: the CLI's error path imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Shorter values are not hidden: replacing every "a" or "/x" in a message would garble it, and
# a value that short carries nothing private.
MIN_HIDDEN_LENGTH = 4

_names_by_value: dict[str, str] = {}


def remember(name: str, value: str) -> None:
    """Note that ``value`` came from ``$name``, so :func:`hide` replaces it."""
    forms = {value}
    try:
        expanded = Path(value).expanduser()
        forms.add(str(expanded))
        forms.add(str(expanded.absolute()))
        forms.add(str(expanded.resolve()))
    except (OSError, RuntimeError, ValueError):  # odd values (a NUL byte, a loop) stay as given
        pass
    for form in forms:
        if len(form.strip()) >= MIN_HIDDEN_LENGTH:
            _names_by_value[form] = f"${name}"


def from_env(name: str) -> str | None:
    """``os.environ[name]`` (``None`` when unset or empty), remembered for :func:`hide`."""
    value = os.environ.get(name)
    if not value:
        return None
    remember(name, value)
    return value


def hide(text: str) -> str:
    """``text`` with every remembered value replaced by ``$NAME`` (longest values first, so a
    value that contains another is replaced whole)."""
    if not _names_by_value or not text:
        return text
    for value in sorted(_names_by_value, key=len, reverse=True):
        if value in text:
            text = text.replace(value, _names_by_value[value])
    return text
