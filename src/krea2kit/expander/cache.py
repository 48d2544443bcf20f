"""Expanded prompts kept on disk, so a re-run gives the same prompt without asking the model.

One small JSON file per answer under ``<cache folder>/prompt-expansions/`` (the user cache
folder platformdirs names, or ``$KREA2KIT_CACHE_DIR`` / ``cache.dir``), named by the sha256
of everything that decides the answer: the backend and its identity (model), the system
prompt's sha256, the prompt, seed, temperature and max_tokens. Written atomically
(:mod:`krea2kit.files`); an entry that does not parse or does not match its key is deleted
and asked again. No secret goes in: the endpoint and key are not part of an entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1
FOLDER = "prompt-expansions"
_MAX_ENTRY_BYTES = 1 << 20


def cache_key(*, backend: str, identity: str, system_prompt_sha256: str, prompt: str, seed: int,
              temperature: float, max_tokens: int) -> str:
    payload = {"format": CACHE_FORMAT, "backend": backend, "identity": identity,
               "system_prompt_sha256": system_prompt_sha256, "prompt": prompt, "seed": int(seed),
               "temperature": float(temperature), "max_tokens": int(max_tokens)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


class ExpansionCache:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        p = self.path(key)
        try:
            if not p.is_file() or p.stat().st_size > _MAX_ENTRY_BYTES:
                self.misses += 1
                return None
            entry = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("expanded"), str) \
                    or not entry["expanded"].strip():
                raise ValueError("not an entry for this key")
        except (OSError, ValueError):
            p.unlink(missing_ok=True)  # a damaged entry is asked again, not trusted
            self.misses += 1
            return None
        self.hits += 1
        return entry["expanded"]

    def put(self, key: str, expanded: str, *, about: dict[str, Any]) -> None:
        """Store an answer; a cache that cannot be written is not an error (the run has its answer)."""
        from krea2kit.files import atomic_write

        data = json.dumps({"key": key, "expanded": expanded, **about}, ensure_ascii=False, sort_keys=True).encode()
        try:
            self.path(key).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path(key), lambda fp: fp.write(data), overwrite=True)
        except OSError:
            pass
        except Exception as exc:  # OutputError from files.py: same, the run goes on
            if not hasattr(exc, "message"):
                raise
