"""Where an expander backend talks to: from the environment and the user config, never a recipe.

Precedence, most specific first: ``$KREA2KIT_EXPANDER_BASE_URL`` / ``_MODEL`` / ``_API_KEY``,
then the user config's ``[expander]`` table (``krea2kit config``), then the variables most
OpenAI-compatible tools read, ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY``.

The key is kept out of every message: a key from the environment or the config is registered
with :mod:`krea2kit.env_values`, whose ``hide`` (applied to every error the CLI prints)
writes ``$NAME`` in its place, and :func:`shown_url` drops credentials and the query string
from an endpoint before it is named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from krea2kit import env_values
from krea2kit.errors import ExpanderError

ENV_BASE_URL = "KREA2KIT_EXPANDER_BASE_URL"
ENV_MODEL = "KREA2KIT_EXPANDER_MODEL"
ENV_API_KEY = "KREA2KIT_EXPANDER_API_KEY"
ENV_OPENAI_BASE_URL = "OPENAI_BASE_URL"
ENV_OPENAI_API_KEY = "OPENAI_API_KEY"

SETUP_HINT = (f"start your OpenAI-compatible server and set its address: export {ENV_BASE_URL}=http://127.0.0.1:8080/v1 "
              "(and _MODEL, _API_KEY if it needs them), or base_url / model / api_key in the user config's "
              "[expander] table (`krea2kit config --path`)")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat endpoint. ``api_key`` never appears in ``repr``."""

    base_url: str
    model: str | None
    api_key: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    timeout: float = 120.0
    source: str = ""  # where base_url came from, for messages ("$KREA2KIT_EXPANDER_BASE_URL", "the user config")

    @property
    def url(self) -> str:
        """``{base_url}/chat/completions``, the OpenAI chat route every compatible server serves."""
        parts = urlsplit(self.base_url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/chat/completions", parts.query, ""))

    @property
    def shown(self) -> str:
        return shown_url(self.url)


def shown_url(url: str) -> str:
    """``url`` without user:password, query or fragment: safe to print."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<an unreadable URL>"


def _pick(settings: Any, attr: str, primary_env: str, fallback_env: str | None) -> tuple[str | None, str]:
    value = env_values.from_env(primary_env)
    if value:
        return value, f"${primary_env}"
    expander = getattr(settings, "expander", None)
    value = getattr(expander, attr, None) if expander is not None else None
    if value is not None and hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    if value:
        return value, "the user config"
    if fallback_env:
        value = env_values.from_env(fallback_env)
        if value:
            return value, f"${fallback_env}"
    return None, ""


def endpoint(settings: Any) -> Endpoint:
    """The endpoint the ``openai`` backend uses; :class:`ExpanderError` (exit 5) when none is
    set or it is not an http(s) URL."""
    base_url, source = _pick(settings, "base_url", ENV_BASE_URL, ENV_OPENAI_BASE_URL)
    if not base_url:
        raise ExpanderError("no prompt expander endpoint is set", key="expander.backend",
                            hint=SETUP_HINT)
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ExpanderError(f"the expander endpoint from {source} is not an http(s) URL", key="expander.base_url",
                            hint="give the server's base URL, e.g. http://127.0.0.1:8080/v1")
    if parts.username is not None or parts.password is not None:
        raise ExpanderError(f"the expander endpoint from {source} ({shown_url(base_url)}) has credentials in its "
                            "URL", key="expander.base_url",
                            hint=f"give the key as ${ENV_API_KEY} or expander.api_key in the user config, and "
                                 "the URL without user:password@")
    model, _ = _pick(settings, "model", ENV_MODEL, None)
    api_key, key_source = _pick(settings, "api_key", ENV_API_KEY, ENV_OPENAI_API_KEY)
    if api_key and key_source == "the user config":
        env_values.remember("expander.api_key", api_key)  # hidden from every message, as env values are
    expander = getattr(settings, "expander", None)
    return Endpoint(base_url=base_url, model=model, api_key=api_key,
                    connect_timeout=float(getattr(expander, "connect_timeout", 10.0)),
                    timeout=float(getattr(expander, "timeout", 120.0)), source=source)


def local_weights(settings: Any, located: str) -> tuple[str, str]:
    """(folder, where it came from) for the ``transformers`` backend: the user config's
    ``expander.weights``, else the run's text encoder weights (``located``)."""
    expander = getattr(settings, "expander", None)
    chosen = getattr(expander, "weights", None) if expander is not None else None
    if chosen:
        return os.path.expanduser(chosen), "expander.weights in the user config"
    return located, "the text encoder weights of the run's model"
