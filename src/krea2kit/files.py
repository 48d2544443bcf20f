"""Writing a file safely: the one helper every command that writes a file goes through.

What it guarantees (issue 12):

* **No partial file.** The content goes into a temporary file in the destination folder,
  is flushed and fsynced, and only then gets its final name.
* **A name is never given twice.** Without ``overwrite`` the final name is taken with
  ``os.link(temp, name)``, which fails with ``EEXIST`` when the name exists: checking that
  a name is free and taking it are one atomic step, so two runs writing into one folder
  can never both be handed the same path (the old exists-check-then-replace lost an image
  that way). With ``numbered=True`` the next name (``-2``, ``-3`` …) is tried instead.
* **A claimed name is always a whole file.** Linking the finished temporary file
  publishes content and name together. The alternative, an ``O_EXCL`` placeholder created
  at the final name before writing, would leave an empty ``image.png`` behind when the
  process is killed (SIGKILL, power loss) and that leftover would both look like an image
  and block its name. Only on file systems without hard links (FAT, some network mounts)
  do we fall back to that placeholder, and then just for the instant between creating it
  and ``os.replace`` of the already complete temporary file over it.
* **Overwrite replaces atomically** (``os.replace``): a reader sees the old file or the
  new one, never a mix.
* **Leftovers are never mistaken for results.** Temporary files are named
  ``.<name>.krea2kit-tmp-<pid>-<random>``: hidden, without the real extension (so no
  image reader, shell glob or ``krea2kit run IMAGE`` takes one for an image), and never a
  name a run would choose. Ctrl-C and SIGTERM unwind the stack, which removes them; the
  CLI also calls :func:`remove_temp_files` before it exits, for a signal that lands in
  the middle of that cleanup. Only SIGKILL can leave one; it may be deleted at any time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from krea2kit.errors import EXIT_USAGE, Krea2kitError

TEMP_MARK = ".krea2kit-tmp-"
#: Room kept in a file name for the ``-N`` that ``numbered`` adds (``-2`` … ``-9999999``).
NUMBER_ROOM = 8
_TEMP_NAME_KEEP = 60  # characters of the final name kept in the temporary name (NAME_MAX)
_MAX_NUMBERED = 100_000
# errno values meaning "this file system cannot make hard links"
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}

# Temporary files being written right now, removed by the CLI on Ctrl-C / SIGTERM.
_live: set[str] = set()


class OutputError(Krea2kitError):
    """A file that could not be written."""


class NameTaken(OutputError):
    """The file exists and the command was not asked to replace it."""

    exit_code = EXIT_USAGE


def user_file_mode() -> int:
    """The permissions a new file gets here (0o666 less the umask), for a file a library wrote
    with its own (0600) temporary file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def sha256_of_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read a MiB at a time (OSError when it cannot be read)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temp_name(name: str) -> bool:
    """True for a temporary file name this module makes (a leftover of a killed process)."""
    return name.startswith(".") and TEMP_MARK in name


def temp_name_for(path: Path) -> Path:
    """A fresh hidden temporary name next to ``path`` (short enough for any ``path`` that fits)."""
    return path.with_name(f".{path.name[:_TEMP_NAME_KEEP]}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def numbered_names(path: Path) -> Iterator[Path]:
    """``path``, then ``stem-2.ext``, ``stem-3.ext`` … (the recipe's ``overwrite = false`` rule)."""
    yield path
    for n in range(2, _MAX_NUMBERED):
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")


def refuse_existing(path: Path, *, hint: str) -> None:
    """Fail early (before any work) when ``path`` exists; the atomic claim still decides later."""
    if os.path.lexists(path):
        raise NameTaken("the file already exists", file=str(path), hint=hint)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = False,
                 numbered: bool = False, hint: str = "choose another name or allow overwriting") -> Path:
    """Write a file with ``write(fp)`` and publish it under ``path``; return the path used.

    ``overwrite``: replace ``path`` if it exists. Otherwise ``numbered`` takes the first free
    name of :func:`numbered_names`, and without it :class:`NameTaken` is raised.
    """

    def fill(tmp: Path, fd: int) -> None:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())

    return _publish(Path(path), fill, overwrite=overwrite, numbered=numbered, hint=hint)


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None], *, overwrite: bool = False,
                numbered: bool = False, hint: str = "choose another name or allow overwriting") -> Path:
    """Like :func:`atomic_write` for a library that writes by file name: ``save(temp_path)``."""

    def fill(tmp: Path, fd: int) -> None:
        mode = os.fstat(fd).st_mode & 0o777  # what the umask gave the placeholder
        os.close(fd)
        save(tmp)
        # a library may write its own temporary file (0600) and rename it over ours: give the
        # result the permissions any file the user creates gets
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fp:
            os.fsync(fp.fileno())

    return _publish(Path(path), fill, overwrite=overwrite, numbered=numbered, hint=hint)


def _publish(path: Path, fill: Callable[[Path, int], None], *, overwrite: bool, numbered: bool, hint: str) -> Path:
    if not overwrite and not numbered:
        refuse_existing(path, hint=hint)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {directory}: {exc.strerror or exc}", file=str(path),
                          hint="choose a folder you can write to") from None
    tmp = temp_name_for(path)
    _live.add(str(tmp))  # registered before it exists: a signal can land between any two lines
    try:
        # 0o666 lets the umask decide the permissions, as for any file the user creates.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        fill(tmp, fd)
        if overwrite:
            os.replace(tmp, path)
            return path
        for candidate in (numbered_names(path) if numbered else (path,)):
            if _claim(tmp, candidate):
                return candidate
        raise NameTaken("the file already exists", file=str(path), hint=hint)
    except BaseException as exc:
        if isinstance(exc, (Krea2kitError, KeyboardInterrupt, SystemExit)):
            raise
        raise OutputError(f"could not write {path}: {_reason(exc)}", file=str(path)) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _live.discard(str(tmp))


def _claim(tmp: Path, candidate: Path) -> bool:
    """Give ``tmp``'s content the name ``candidate`` unless that name exists; True if it did."""
    try:
        os.link(tmp, candidate)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    # No hard links here: an exclusive placeholder claims the name, and the finished file
    # replaces it at once.
    try:
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    os.close(fd)
    try:
        os.replace(tmp, candidate)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(candidate)
        raise
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def remove_temp_files() -> None:
    """Remove every temporary file still being written (the CLI calls this on Ctrl-C / SIGTERM)."""
    for name in list(_live):
        with contextlib.suppress(OSError):
            os.unlink(name)
        _live.discard(name)


__all__ = ["NameTaken", "OutputError", "TEMP_MARK", "atomic_save", "atomic_write", "is_temp_name",
           "numbered_names", "refuse_existing", "remove_temp_files", "temp_name_for"]
