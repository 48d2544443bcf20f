"""Append-only JSONL audit log of content-filter verdicts.

One JSON object per line, one line per verdict:

    {"time": "2026-11-25T20:15:00.123456Z", "run_id": "...", "kind": "prompt"|"image",
     "item": <image reference or null>, "filter": "...", "filter_version": "...",
     "action": "allow"|"flag"|"block", "category": ..., "score": ..., "detail": "...",
     "decision": "allow"|"flag"|"block", "prompt_sha256": "..." | "prompt": "..."}

Prompts are hashed by default (``prompt_mode="hash"``; the licence-relevant record is *that* a
prompt was blocked and by which rule, not its text); ``"text"`` stores them, ``"none"`` omits them.
The hash is a plain sha256 of the UTF-8 prompt, so the same prompt can be found again by hashing
it; it is not meant to resist guessing of short prompts.

Concurrency: the file is opened with ``O_APPEND`` and each :meth:`AuditLog.record` call writes all
its lines with a single ``write(2)``, so records from several processes never interleave on a
local file system. Nothing is buffered in Python; ``fsync=True`` also forces it to disk.

Fail closed: an image is written only after its verdict is logged, so a log that cannot be
written stops the run (:class:`AuditLogError`). :meth:`AuditLog.check_writable` finds that out
at the start of a run, before any filter or model loads, rather than after the first image.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from krea2kit.errors import EXIT_USAGE, Krea2kitError

from .verdict import Decision

PROMPT_MODES = ("hash", "text", "none")


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


AUDIT_LOG_FIX = ("make that folder and file writable, or set [safety] audit_log = \"/writable/audit.jsonl\" "
                 "in the user config (`krea2kit config --path` shows where it is); filtered runs "
                 "need a log they can append to")


class AuditLogError(Krea2kitError):
    """The audit log cannot be appended to, so nothing is generated (fail closed)."""


class AuditLogUnwritable(AuditLogError):
    """Found before the run started: a setup problem, like a recipe error (exit 2)."""

    exit_code = EXIT_USAGE


def _open_for_append(path: Path, *, nonblocking: bool = False) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (getattr(os, "O_NONBLOCK", 0) if nonblocking else 0)
    return os.open(path, flags, 0o600)


def _reason(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be opened, in words (``mkdir`` says "File exists" when a folder on
    the way is a file)."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                return f"{ancestor} is a file, not a folder"
            break
    return exc.strerror or str(exc)


class AuditLog:
    """``AuditLog(path, prompt_mode="hash").record(run_id, kind, item_ref, decision)``.

    The parent directory is created if needed; the file is created with mode 0o600 (prompts or
    their hashes are private to the deployer).
    """

    def __init__(self, path: str | os.PathLike, *, prompt_mode: str = "hash", fsync: bool = False):
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        self.path = Path(path)
        self.prompt_mode = prompt_mode
        self.fsync = fsync

    def check_writable(self) -> None:
        """Raise :class:`AuditLogUnwritable` (naming the file and the fix) unless the log can be
        opened for appending. Creates the file (empty) if it does not exist yet. Opened
        non-blocking, so a named pipe with no reader is refused instead of waited on."""
        try:
            fd = _open_for_append(self.path, nonblocking=True)
        except OSError as exc:
            raise AuditLogUnwritable(f"cannot write the content-filter audit log: {_reason(self.path, exc)}",
                                     file=str(self.path), hint=AUDIT_LOG_FIX) from None
        os.close(fd)

    def _prompt_fields(self, prompt: str | None) -> dict[str, Any]:
        if prompt is None or self.prompt_mode == "none":
            return {}
        if self.prompt_mode == "text":
            return {"prompt": prompt}
        return {"prompt_sha256": prompt_sha256(prompt)}

    def record(self, run_id: str, kind: str, item_ref: str | None, decision: Decision, *,
               prompt: str | None = None, extra: dict[str, Any] | None = None) -> int:
        """Append one line per verdict of ``decision``; return the number of lines written.

        For ``kind="prompt"`` the item *is* the prompt: ``item_ref`` is treated as the prompt
        text (stored per ``prompt_mode``, never as ``item``) unless ``prompt`` is given. For
        ``kind="image"``, ``item_ref`` is how to find the image again (a path, ``"batch 0/3"``)
        and ``prompt`` optionally ties it to its prompt. A decision with no verdicts (an
        acknowledged unfiltered run) still writes one line with ``"filter": null``.
        """
        if kind == "prompt" and prompt is None:
            prompt, item_ref = item_ref, None
        time = _now_iso()
        base = {"time": time, "run_id": run_id, "kind": kind, "item": item_ref}
        base.update(self._prompt_fields(prompt))
        rows = []
        verdicts = decision.verdicts or (None,)
        for v in verdicts:
            row = dict(base)
            if v is None:
                row.update({"filter": None, "filter_version": None, "action": decision.action,
                            "category": None, "score": None, "detail": "no filter ran"})
            else:
                row.update({"filter": v.filter, "filter_version": v.version, "action": v.action,
                            "category": v.category, "score": v.score, "detail": v.detail})
            row["decision"] = decision.action
            if extra:
                row.update(extra)
            rows.append(json.dumps(row, ensure_ascii=False, sort_keys=False, allow_nan=False))
        data = ("\n".join(rows) + "\n").encode("utf-8")
        try:
            fd = _open_for_append(self.path)
            try:
                written = os.write(fd, data)
                while written < len(data):  # short writes are rare; keep appending the rest
                    written += os.write(fd, data[written:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk, a log removed or locked mid-run: stop, fail closed
            raise AuditLogError(f"cannot append to the content-filter audit log: {_reason(self.path, exc)}; "
                                "stopped without writing anything whose verdict is not logged",
                                file=str(self.path), hint=AUDIT_LOG_FIX) from None
        return len(rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Read the log back (for tests and ``krea2kit audit``-style tools)."""
        if not self.path.exists():
            return iter(())
        with open(self.path, encoding="utf-8") as fp:
            return iter([json.loads(line) for line in fp if line.strip()])
