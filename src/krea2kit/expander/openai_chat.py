"""The ``openai`` expander backend: any OpenAI-compatible chat endpoint, standard library only.

One ``POST {base_url}/chat/completions`` per prompt with the OpenAI chat request body
(``model``, ``messages`` = system + user, ``temperature``, ``max_tokens``, ``seed``,
``stream = false``) and ``Authorization: Bearer KEY`` when a key is set; the answer is
``choices[0].message.content``. llama.cpp's server, Ollama, vLLM and LM Studio all serve
this route (OpenAI API reference, "Create chat completion").

Never a hang: connecting is bounded by ``connect_timeout``, the whole exchange (waiting for
the answer and reading it) by ``timeout``, each read given only the time left. Redirects are
refused, so the key is never forwarded to another host. Every failure is an
:class:`~krea2kit.errors.ExpanderError` (exit 5) naming the endpoint (without credentials)
and the fix; the key is never part of a message.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from krea2kit.contracts import LoadContext
from krea2kit.errors import ExpanderError
from krea2kit.expander.answers import usable
from krea2kit.expander.config import SETUP_HINT, Endpoint, endpoint

#: An answer larger than this is not a prompt: stop reading (a misdirected download, say).
MAX_RESPONSE_BYTES = 4 << 20
_CHUNK = 1 << 16


def _timed(base: type) -> type:
    """``base`` (HTTP or HTTPS connection) whose connect (TCP and TLS handshake) is bounded by
    ``connect_timeout`` and whose reads then get the request's own timeout."""

    class Timed(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, connect_timeout: float, opened: list, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._connect_timeout = connect_timeout
            opened.append(self)  # the caller shortens each read to the time left

        def connect(self) -> None:
            read_timeout = self.timeout
            self.timeout = self._connect_timeout
            try:
                super().connect()
            finally:
                self.timeout = read_timeout
            self.sock.settimeout(read_timeout)

    return Timed


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib's signature
        return None  # urllib then raises the 3xx as an HTTPError


def _opener(connect_timeout: float, opened: list) -> urllib.request.OpenerDirector:
    http_cls, https_cls = _timed(http.client.HTTPConnection), _timed(http.client.HTTPSConnection)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_cls, req, connect_timeout=connect_timeout, opened=opened)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_cls, req, context=self._context, connect_timeout=connect_timeout,
                                opened=opened)

    return urllib.request.build_opener(HTTP(), HTTPS(), _NoRedirect())


class OpenAIChatExpander:
    """:class:`krea2kit.contracts.PromptExpander` over an OpenAI-compatible endpoint."""

    def __init__(self, target: Endpoint) -> None:
        self.endpoint = target
        self.identity = f"openai:{target.model or 'default'}"

    def __repr__(self) -> str:  # the key stays out of any repr, log or traceback
        return f"OpenAIChatExpander({self.endpoint.shown}, model={self.endpoint.model!r})"

    def request_body(self, prompt: str, *, system_prompt: str, seed: int, temperature: float,
                     max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}],
            "temperature": float(temperature), "max_tokens": int(max_tokens), "seed": int(seed), "stream": False,
        }
        if self.endpoint.model:
            body = {"model": self.endpoint.model, **body}
        return body

    def expand(self, prompt: str, *, system_prompt: str, seed: int, temperature: float, max_tokens: int) -> str:
        data = self._post(self.request_body(prompt, system_prompt=system_prompt, seed=seed,
                                            temperature=temperature, max_tokens=max_tokens))
        return usable(self._content(data), where=self.endpoint.shown,
                      hint="try another model or a larger expander.max_tokens, or set expander.on_failure = "
                           "\"original\" to keep such prompts as written")

    # -- the exchange --------------------------------------------------------
    def _fail(self, what: str, hint: str) -> ExpanderError:
        return ExpanderError(f"prompt expander endpoint {self.endpoint.shown}: {what}", key="expander", hint=hint)

    def _post(self, body: dict[str, Any]) -> Any:
        ep = self.endpoint
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "krea2kit-expander"}
        if ep.api_key:
            headers["Authorization"] = f"Bearer {ep.api_key}"
        request = urllib.request.Request(ep.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        opened: list = []
        deadline = time.monotonic() + ep.timeout
        try:
            with _opener(ep.connect_timeout, opened).open(request, timeout=ep.timeout) as response:
                raw = self._read(response, opened, deadline)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise self._timeout() from None
            raise self._fail(f"cannot connect ({reason})", SETUP_HINT) from None
        except (socket.timeout, TimeoutError):
            raise self._timeout() from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise self._fail(f"the connection failed ({type(exc).__name__}: {exc})",
                             "check that the server is running and speaks HTTP at that address") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self._fail("the answer is not JSON", "base_url must be the server's OpenAI-compatible API root "
                                                       "(usually ending in /v1)") from None

    def _read(self, response: Any, opened: list, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout()
            for conn in opened:  # each read gets only the time left of the whole exchange
                if conn.sock is not None:
                    conn.sock.settimeout(left)
            chunk = response.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise self._fail(f"the answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB",
                                 "base_url must be the server's OpenAI-compatible API root")
            chunks.append(chunk)

    def _timeout(self) -> ExpanderError:
        ep = self.endpoint
        return self._fail(f"no answer within the time allowed (connect {ep.connect_timeout:g} s, "
                          f"whole answer {ep.timeout:g} s)",
                          "check the server, raise expander.timeout in the user config, or lower "
                          "expander.max_tokens in the recipe")

    def _http_error(self, exc: urllib.error.HTTPError) -> ExpanderError:
        detail = ""
        try:
            payload = json.loads(exc.read(64 << 10).decode("utf-8", "replace"))
            err = payload.get("error") if isinstance(payload, dict) else None
            detail = (err.get("message") if isinstance(err, dict) else err) or ""
        except Exception:  # noqa: BLE001 - any body: the status alone is the message
            pass
        detail = str(detail)
        if self.endpoint.api_key:  # a server may echo the header back
            detail = detail.replace(self.endpoint.api_key, "***")
        detail = f": {' '.join(detail.split())[:200]}" if detail else ""
        code = exc.code
        if code in (401, 403):
            hint = "check the API key ($KREA2KIT_EXPANDER_API_KEY or expander.api_key in the user config)"
        elif code == 404:
            hint = ("base_url must be the API root the server serves /chat/completions under (usually ending in "
                    "/v1), and the model name one it knows ($KREA2KIT_EXPANDER_MODEL or expander.model)")
        elif 300 <= code < 400:
            hint = "the endpoint redirects (not followed, so the key goes nowhere else): set base_url to the final address"
        elif code == 429 or code >= 500:
            hint = "the server is busy or failing: try again later, or set expander.on_failure = \"original\""
        else:
            hint = "check expander.model and the recipe's [expander] settings against what the server accepts"
        return self._fail(f"HTTP {code}{detail}", hint)

    def _content(self, data: Any) -> str:
        malformed = "the answer is not an OpenAI chat completion (no choices[0].message.content)"
        fix = "base_url must point at an OpenAI-compatible chat API"
        if not isinstance(data, dict):
            raise self._fail(malformed, fix)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._fail(malformed, fix)
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise self._fail(malformed, fix)
        refusal = message.get("refusal")
        if choice.get("finish_reason") == "content_filter" or (isinstance(refusal, str) and refusal.strip()):
            raise self._fail("the model refused the prompt",
                             "rephrase the prompt, or set expander.on_failure = \"original\" to keep such prompts "
                             "as written")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise self._fail(malformed, fix)
        return content


def load(options: Any, context: LoadContext) -> OpenAIChatExpander:
    """The backend for the endpoint the user config / environment names (``context.settings``)."""
    return OpenAIChatExpander(endpoint(context.settings))
