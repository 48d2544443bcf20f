"""User- and deployer-level settings: one TOML file outside recipes.

Location: ``$KREA2KIT_CONFIG`` if set, else the platform config folder
(``$XDG_CONFIG_HOME/krea2kit/config.toml`` or ``~/.config/krea2kit/config.toml`` on
Linux, ``~/Library/Application Support/krea2kit/config.toml`` on macOS,
``%APPDATA%\\krea2kit\\config.toml`` on Windows). Weight locations live here so recipes
stay portable; deployer duties (switching mandatory filters off, the audit log) live
here because a recipe must not be able to change them.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ENV_CONFIG = "KREA2KIT_CONFIG"
ENV_CACHE = "KREA2KIT_CACHE_DIR"


def config_dir() -> Path:
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "krea2kit"


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "krea2kit"


def config_path() -> Path:
    env = os.environ.get(ENV_CONFIG)
    return Path(env).expanduser() if env else config_dir() / "config.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PresetWeights(_Strict):
    dit: str | None = None
    text_encoder: str | None = None
    vae: str | None = None


class SafetySettings(_Strict):
    unfiltered: bool = Field(
        False,
        description="Deployer switch: run without the mandatory content filters. Every image then records that it was produced unfiltered.")
    audit_log: str | None = Field(None, description="Append-only JSON-lines audit log of every filter verdict (default: in the state folder)")
    audit_prompts: Literal["hash", "text", "none"] = "hash"
    image_threshold: float | None = Field(None, ge=0.0, le=1.0, description="Deployer default for the NSFW image threshold")


class CacheSettings(_Strict):
    dir: str | None = None
    prompt_embeddings: bool = True


class Settings(_Strict):
    default_model: str | None = None
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    weights: dict[str, PresetWeights] = Field(default_factory=dict)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)

    path: str | None = Field(None, exclude=True)

    def cache_root(self) -> Path:
        return Path(self.cache.dir).expanduser() if self.cache.dir else cache_dir()

    def audit_path(self) -> Path:
        if self.safety.audit_log:
            return Path(self.safety.audit_log).expanduser()
        return self.cache_root() / "audit.jsonl"


def load_settings(path: Path | None = None) -> Settings:
    """Read the settings file (a missing file means defaults)."""
    from krea2kit.recipe.errors import validate_model
    from krea2kit.recipe.loader import parse_toml

    path = path or config_path()
    data: dict[str, Any] = {}
    if path.is_file():
        data = parse_toml(path.read_text(encoding="utf-8"), str(path))
    settings = validate_model(Settings, data, file=str(path))
    settings.path = str(path)
    return settings


@lru_cache(maxsize=1)
def _cached(path: str) -> Settings:
    return load_settings(Path(path))


def get_settings() -> Settings:
    return _cached(str(config_path()))
