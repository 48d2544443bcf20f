"""Reading TOML that may come from strangers: regular files only, size- and depth-capped.

Recipes, their ``extends`` parents and the user config are all read through here, so a
FIFO, a device such as ``/dev/zero``, a huge file or pathologically nested data is refused
with a clear :class:`~krea2kit.errors.RecipeError` instead of hanging or recursing.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from krea2kit.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Recipe files are small text; a larger file (or a device posing as one) is refused before
# it is read. 1 MiB is hundreds of times the largest real recipe.
MAX_RECIPE_BYTES = 1 << 20
# Real recipes nest tables and arrays a handful of levels; deeper data is refused, well
# before Python's recursion limit is near.
MAX_NESTING = 32


def parse_toml(text: str, file: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", file=file, hint="check quotes, brackets and '=' near that line") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise RecipeError(f"invalid TOML: nested more than {MAX_NESTING} levels deep", file=file,
                          hint="a recipe needs a few levels of tables and arrays, not hundreds") from None
    check_nesting(data, file)
    return data


def check_nesting(data: Any, file: str) -> None:
    """Refuse data nested deeper than :data:`MAX_NESTING` (walked without recursion), so
    nothing downstream (merging, validation, metadata) recurses into it."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        node, depth, key = stack.pop()
        if depth > MAX_NESTING:
            raise RecipeError(f"tables and arrays are nested more than {MAX_NESTING} levels deep",
                              file=file, key=re.split(r"[.\[]", key, maxsplit=1)[0] or None,
                              hint="a recipe needs a few levels of tables and arrays, not hundreds")
        if isinstance(node, dict):
            stack.extend((v, depth + 1, f"{key}.{k}" if key else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{key}[{i}]") for i, v in enumerate(node))


class NotARegularFile(OSError):
    """A path that names a folder, FIFO, device or socket (``kind`` says which, in words)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class FileTooLarge(OSError):
    """A regular file over the size limit (``size``: its size, or what was read of it)."""

    def __init__(self, size: int):
        super().__init__(f"{size} bytes")
        self.size = size


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_text_file(path: Path, *, limit: int = MAX_RECIPE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes.

    Anything else (a folder, a FIFO, a device such as /dev/zero, a file that is too large)
    raises :class:`NotARegularFile` or :class:`FileTooLarge` without reading it, and without
    blocking: the path is checked before it is opened, opened non-blocking, checked again on
    the open descriptor (it may have been swapped in between) and read to the limit only.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotARegularFile(_file_kind(mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(_file_kind(info.st_mode))
        if info.st_size > limit:
            raise FileTooLarge(info.st_size)
        chunks, total = [], 0
        while total <= limit:  # the file may grow after fstat: never read more than the limit + 1
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise FileTooLarge(total)
    finally:
        os.close(fd)
    # Line endings become "\n" as Path.read_text made them; a UTF-8 byte-order mark (some
    # Windows editors write one) is dropped rather than reported as invalid TOML.
    return b"".join(chunks).decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
