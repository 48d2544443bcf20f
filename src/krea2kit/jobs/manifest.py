"""A job's manifest: one JSON line per finished (or blocked) image, appended as it finishes.

Written by **append + fsync per line**, not by rewriting the whole file and renaming it:

* a job of N images would rewrite the file N times (O(N^2) bytes, and an fsync of the whole
  file per image); an append is one short write and one fsync, whatever N is;
* a line is written with one ``write`` on an ``O_APPEND`` descriptor, so the lines of one run
  never interleave, and after ``fsync`` returns the line survives a crash or power loss;
* the one thing a crash can leave is a torn *last* line (the process died inside that
  write). Readers skip any line that is not a whole JSON object, and the image it described
  is simply rendered again (it is not trusted without its line).

On resume an image counts as finished only when its latest line says ``ok``, the job item it
describes is unchanged (``key``: a hash of everything that decides its pixels), and the file at
``path`` still has the ``sha256`` recorded; anything else is rendered again.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krea2kit.errors import UsageError
from krea2kit.files import sha256_of_file

#: Fields every manifest line carries (more may follow).
FIELDS = ("index", "prompt", "seed", "path", "sha256", "status")


def file_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a regular file, or None when there is none to read."""
    try:
        if not os.path.isfile(path):
            return None
        return sha256_of_file(path)
    except OSError:
        return None


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every whole line of a manifest (a torn or foreign line is skipped); [] when absent."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read the job manifest: {exc.strerror or exc}", file=str(path)) from None
    out = []
    for line in raw.split(b"\n"):
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("index"), int):
            out.append(obj)
    return out


@dataclass
class Manifest:
    """Append-only JSON lines at ``path``; holds an exclusive lock while open, so two runs of
    one job never render the same images at once."""

    path: Path
    _fd: int | None = None

    def open(self) -> Manifest:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        except OSError as exc:
            raise UsageError(f"cannot open the job manifest: {exc.strerror or exc}", file=str(self.path),
                             hint="choose an output.dir you can write to") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no flock (Windows): one run per job is on the user
            pass
        except OSError:
            os.close(fd)
            raise UsageError("another run of this job is using its manifest", file=str(self.path),
                             hint="wait for it to finish (or stop it); a job runs once at a time") from None
        self._fd = fd
        # A torn last line (a crash mid-write) gets its line break, so the next line starts clean.
        with contextlib.suppress(OSError):
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        os.write(fd, b"\n")
        return self

    def append(self, entry: dict[str, Any]) -> None:
        """One line, one write, then fsync: the line is on disk when this returns."""
        assert self._fd is not None, "Manifest.open() first"
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk: the partial line is torn and will be skipped
            raise OSError(f"short write to {self.path}")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> Manifest:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def finished(lines: list[dict[str, Any]], keys: dict[int, str], *, base: Path | None = None) -> dict[int, dict]:
    """The items whose image is done and intact: ``{index: its latest ok line}`` for items
    whose latest line is ``ok`` with the item's current ``key`` and whose file still hashes to
    the recorded sha256. ``base`` resolves relative paths (the folder the job ran in)."""
    latest: dict[int, dict[str, Any]] = {}
    for line in lines:
        latest[line["index"]] = line  # a later line for the same item replaces an earlier one
    done = {}
    for index, line in latest.items():
        if index not in keys or line.get("status") != "ok" or line.get("key") != keys[index]:
            continue
        path, sha = line.get("path"), line.get("sha256")
        if not isinstance(path, str) or not isinstance(sha, str):
            continue
        full = Path(path) if base is None or Path(path).is_absolute() else base / path
        if file_sha256(full) == sha:
            done[index] = line
    return done
