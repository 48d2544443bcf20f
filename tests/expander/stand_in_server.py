"""A stand-in OpenAI-compatible chat server on 127.0.0.1 (``http.server`` in a thread).

It speaks the real protocol: ``POST /v1/chat/completions`` with a JSON body (``model``,
``messages`` = system + user, ``temperature``, ``max_tokens``, ``seed``) and answers with a
chat completion (``choices[0].message.content``, ``finish_reason``); a request of another
shape gets OpenAI's error object with HTTP 400, and a wrong key HTTP 401. Every request is
recorded (path, headers, body) for the tests to inspect; ``mode`` switches misbehaviours.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "sk-test-5ecret-key-0123456789"


class StandIn:
    def __init__(self, key: str | None = KEY) -> None:
        self.key = key
        self.requests: list[dict] = []
        self.mode = "ok"
        self.answer = lambda prompt: f"A detailed photograph of {prompt}, in soft morning light."
        self.delay = 0.0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                stand_in._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the protocol ----------------------------------------------------------
    def _send(self, h, status: int, payload, *, raw: bytes | None = None, headers: dict | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def _error(self, h, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(h, status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _handle(self, h) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append({"path": h.path, "headers": {k.lower(): v for k, v in h.headers.items()}, "body": body})
        if self.delay:
            time.sleep(self.delay)
        if h.path != "/v1/chat/completions":
            return self._error(h, 404, f"Unknown request URL: POST {h.path}")
        if self.key is not None and h.headers.get("Authorization") != f"Bearer {self.key}":
            # as OpenAI does; a careless server may echo what it got, so this one does
            return self._error(h, 401, f"Incorrect API key provided: {h.headers.get('Authorization')}")
        if h.headers.get("Content-Type") != "application/json" or not isinstance(body, dict):
            return self._error(h, 400, "body must be JSON")
        messages = body.get("messages")
        if (not isinstance(messages, list) or [m.get("role") for m in messages] != ["system", "user"]
                or not all(isinstance(m.get("content"), str) for m in messages)):
            return self._error(h, 400, "messages must be [system, user] with string content")
        for key, kind in (("temperature", float), ("max_tokens", int), ("seed", int)):
            if not isinstance(body.get(key), kind) or isinstance(body.get(key), bool):
                return self._error(h, 400, f"{key} must be a {kind.__name__}")
        mode = self.mode
        if mode == "http500":
            return self._error(h, 500, "The server had an error while processing your request", "server_error")
        if mode == "malformed":
            return self._send(h, 200, None, raw=b"<html>not json</html>")
        if mode == "no_choices":
            return self._send(h, 200, {"id": "x", "object": "chat.completion", "choices": []})
        if mode == "redirect":
            return self._send(h, 307, {}, headers={"Location": self.redirect_to})
        content = self.answer(messages[1]["content"])
        finish = "stop"
        if mode == "empty":
            content = ""
        elif mode == "content_filter":
            content, finish = None, "content_filter"
        elif mode == "refusal_text":
            content = "I'm sorry, but I can't help with that request."
        self._send(h, 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "stand-in"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        })
