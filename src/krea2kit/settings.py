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
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

ENV_CONFIG = "KREA2KIT_CONFIG"
ENV_CACHE = "KREA2KIT_CACHE_DIR"


def config_dir() -> Path:
    """The per-user config folder, as platformdirs places it on each OS."""
    import platformdirs

    return Path(platformdirs.user_config_dir("krea2kit", appauthor=False, roaming=True))


def cache_dir() -> Path:
    """``$KREA2KIT_CACHE_DIR``, or the per-user cache folder platformdirs names."""
    from krea2kit import env_values

    if env_values.from_env(ENV_CACHE):  # remembered: messages show $KREA2KIT_CACHE_DIR, not the path
        return Path(os.environ[ENV_CACHE]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("krea2kit", appauthor=False))


def config_path() -> Path:
    from krea2kit import env_values

    env = env_values.from_env(ENV_CONFIG)  # remembered: messages show $KREA2KIT_CONFIG, not the path
    return Path(env).expanduser() if env else config_dir() / "config.toml"


class _Strict(BaseModel):
    # As in recipes: unknown keys refused, strict types (``unfiltered = "no"`` is an error,
    # not True), finite numbers.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PresetWeights(_Strict):
    dit: str | None = None
    text_encoder: str | None = None
    vae: str | None = None


class SafetySettings(_Strict):
    unfiltered: bool = Field(
        False,
        description="Deployer switch: run without the mandatory content filters. Every image then records that it was produced unfiltered.")
    audit_log: str | None = Field(None, description="Append-only JSON-lines audit log of every filter verdict (default: audit.jsonl in the cache folder)")
    audit_prompts: Literal["hash", "text", "none"] = "hash"
    image_threshold: float | None = Field(None, ge=0.0, le=1.0, description="Deployer default for the NSFW image threshold")


class CacheSettings(_Strict):
    dir: str | None = None
    prompt_embeddings: bool = True
    prompt_expansions: bool = Field(True, description="Keep [expander] answers in the cache folder, so re-runs "
                                                      "are deterministic and need no endpoint")


class MetadataSettings(_Strict):
    local_paths: bool = Field(
        False, description="Record the absolute local paths of weights and LoRA files in image metadata "
                           "(default: file names and hashes only, so a shared image reveals no local folders)")


class ExpanderSettings(_Strict):
    """Where the prompt expander backends talk to. Only here (or in the environment), never in
    a recipe: a recipe someone sends you cannot point your prompts at their server or read your
    key. Environment variables win: ``KREA2KIT_EXPANDER_BASE_URL`` / ``_MODEL`` / ``_API_KEY``,
    then these keys, then the common ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``."""

    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 "
                                                   "(llama.cpp server), http://127.0.0.1:11434/v1 (Ollama)")
    model: str | None = Field(None, description="Model name sent to the endpoint")
    # SecretStr: `krea2kit config` and any dump of the settings show ********** instead of the key.
    api_key: SecretStr | None = Field(None, description="Bearer key for the endpoint (sent only to base_url)")
    connect_timeout: float = Field(10.0, gt=0, le=600, description="Seconds to wait for the endpoint to accept")
    timeout: float = Field(120.0, gt=0, le=3600, description="Seconds the whole answer may take")
    weights: str | None = Field(None, description="transformers backend: the Qwen3-VL-4B-Instruct folder "
                                                  "(default: the text encoder folder of the run's model)")
    device: str | None = Field(None, description="transformers backend: device (default: the run's)")


class Settings(_Strict):
    default_model: str | None = None
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    weights: dict[str, PresetWeights] = Field(default_factory=dict)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    metadata: MetadataSettings = Field(default_factory=MetadataSettings)
    expander: ExpanderSettings = Field(default_factory=ExpanderSettings)

    path: str | None = Field(None, exclude=True)

    def cache_root(self) -> Path:
        return Path(self.cache.dir).expanduser() if self.cache.dir else cache_dir()

    def audit_path(self) -> Path:
        if self.safety.audit_log:
            return Path(self.safety.audit_log).expanduser()
        return self.cache_root() / "audit.jsonl"


def load_settings(path: Path | None = None) -> Settings:
    """Read the settings file (a missing file means defaults)."""
    from krea2kit.errors import RecipeError
    from krea2kit.validation import validate_model
    from krea2kit.tomlfiles import FileTooLarge, NotARegularFile, parse_toml, read_text_file

    path = path or config_path()
    data: dict[str, Any] = {}
    fix = f"the config must be a small TOML file; ${ENV_CONFIG} chooses another path"
    try:
        text = read_text_file(path)
    except FileNotFoundError:
        text = ""  # no config file yet: every setting has its default
    except NotARegularFile as exc:
        raise RecipeError(f"the config file is {exc.kind}, not a TOML file", file=str(path), hint=fix) from None
    except FileTooLarge as exc:
        raise RecipeError(f"the config file is {exc.size} bytes; a config file is small text", file=str(path),
                          hint=fix) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"the config file is not UTF-8 text (byte {exc.start})", file=str(path)) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the config file: {exc.strerror or exc}", file=str(path), hint=fix) from None
    if text:
        data = parse_toml(text, str(path))
    settings = validate_model(Settings, data, file=str(path))
    settings.path = str(path)
    return settings


@lru_cache(maxsize=1)
def _cached(path: str) -> Settings:
    return load_settings(Path(path))


def get_settings() -> Settings:
    return _cached(str(config_path()))
