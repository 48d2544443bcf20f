"""The ``openai`` expander backend against the stand-in server: the request it sends, and every
way an endpoint can fail (each an ExpanderError, exit 5, naming the endpoint but never the key)."""

from __future__ import annotations

import socket
import time

import pytest
from stand_in_server import KEY, StandIn

from krea2kit.errors import EXIT_EXPANDER, ExpanderError
from krea2kit.expander.config import endpoint, shown_url
from krea2kit.expander.openai_chat import OpenAIChatExpander
from krea2kit.expander.system_prompt import builtin
from krea2kit.settings import Settings


def make(stand_in, *, key=KEY, timeout=10.0, connect_timeout=5.0, model="stand-in-model"):
    settings = Settings.model_validate({"expander": {"base_url": stand_in.base_url if stand_in else "http://127.0.0.1:9/v1",
                                                     "model": model, "api_key": key, "timeout": timeout,
                                                     "connect_timeout": connect_timeout}})
    return OpenAIChatExpander(endpoint(settings))


def call(exp, prompt="a red fox", **kw):
    args = {"system_prompt": builtin().text, "seed": 7, "temperature": 0.25, "max_tokens": 200, **kw}
    return exp.expand(prompt, **args)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("KREA2KIT_EXPANDER_BASE_URL", "KREA2KIT_EXPANDER_MODEL", "KREA2KIT_EXPANDER_API_KEY",
                 "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_request_is_an_openai_chat_completion(stand_in):
    text = call(make(stand_in), "a red fox")
    assert text == "A detailed photograph of a red fox, in soft morning light."
    (req,) = stand_in.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert req["headers"]["content-type"] == "application/json"
    body = req["body"]
    assert body["model"] == "stand-in-model"
    assert body["messages"] == [{"role": "system", "content": builtin().text}, {"role": "user", "content": "a red fox"}]
    assert (body["seed"], body["temperature"], body["max_tokens"], body["stream"]) == (7, 0.25, 200, False)


def test_no_key_sends_no_authorization(stand_in):
    stand_in.key = None
    call(make(stand_in, key=None))
    assert "authorization" not in stand_in.requests[0]["headers"]


def test_answer_is_cleaned_to_one_paragraph(stand_in):
    stand_in.answer = lambda p: '<think>the user wants a fox</think>\n"A fox\n\nin snow."'
    assert call(make(stand_in)) == "A fox in snow."
    stand_in.answer = lambda p: 'Prompt: a shop sign reading "OPEN 24/7" above a door'
    assert call(make(stand_in)) == 'a shop sign reading "OPEN 24/7" above a door'  # inner quotes kept


def failure(exp, **kw) -> ExpanderError:
    with pytest.raises(ExpanderError) as info:
        call(exp, **kw)
    err = info.value
    assert err.exit_code == EXIT_EXPANDER == 5
    assert KEY not in str(err) and KEY not in repr(exp)
    return err


def test_endpoint_down_names_it_and_the_fix():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings.model_validate({"expander": {"base_url": f"http://127.0.0.1:{port}/v1?token=abc",
                                                     "api_key": KEY}})
    err = failure(OpenAIChatExpander(endpoint(settings)))
    text = str(err)
    assert f"http://127.0.0.1:{port}/v1/chat/completions:" in text and "cannot connect" in text
    assert "token" not in text  # the query string (a key some servers take there) is not shown
    assert "KREA2KIT_EXPANDER_BASE_URL" in text  # the fix
    with pytest.raises(ExpanderError) as info:  # credentials in the URL: refused, never shown
        endpoint(Settings.model_validate({"expander": {"base_url": f"http://user:pw@127.0.0.1:{port}/v1"}}))
    assert "pw" not in str(info.value) and "credentials" in str(info.value)


def test_slow_server_times_out_instead_of_hanging(stand_in):
    stand_in.delay = 3.0
    start = time.monotonic()
    err = failure(make(stand_in, timeout=0.5))
    assert time.monotonic() - start < 2.5
    assert "no answer within" in str(err) and "expander.timeout" in str(err)


def test_http_errors_say_what_to_fix_and_never_echo_the_key(stand_in):
    err = failure(make(stand_in, key="sk-wrong-key-abcdef"))  # the server echoes the header it got
    assert "HTTP 401" in str(err) and "sk-wrong-key-abcdef" not in str(err) and "API key" in str(err)
    stand_in.mode = "http500"
    assert "HTTP 500" in str(failure(make(stand_in)))


@pytest.mark.parametrize("mode, words", [("empty", "empty answer"), ("content_filter", "refused"),
                                         ("refusal_text", "refused"), ("malformed", "not JSON"),
                                         ("no_choices", "not an OpenAI chat completion")])
def test_unusable_answers(stand_in, mode, words):
    stand_in.mode = mode
    assert words in str(failure(make(stand_in)))


def test_redirects_are_not_followed(stand_in):
    other = StandIn(key=None)
    try:
        stand_in.redirect_to = other.base_url + "/chat/completions"
        stand_in.mode = "redirect"
        err = failure(make(stand_in))
        assert "HTTP 307" in str(err) and other.requests == []  # the key went nowhere else
    finally:
        other.stop()


def test_config_precedence_and_no_endpoint(monkeypatch):
    settings = Settings.model_validate({"expander": {"base_url": "http://config:1/v1", "model": "m-config"}})
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai-env:2/v1")
    assert endpoint(settings).base_url == "http://config:1/v1"  # the user config beats the generic variable
    monkeypatch.setenv("KREA2KIT_EXPANDER_BASE_URL", "http://k-env:3/v1")
    assert endpoint(settings).base_url == "http://k-env:3/v1"  # krea2kit's own variable beats both
    monkeypatch.delenv("KREA2KIT_EXPANDER_BASE_URL")
    assert endpoint(Settings()).base_url == "http://openai-env:2/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ExpanderError, match="no prompt expander endpoint"):
        endpoint(Settings())
    with pytest.raises(ExpanderError, match="not an http"):
        endpoint(Settings.model_validate({"expander": {"base_url": "file:///etc/passwd"}}))
    assert shown_url("https://u:p@h.example:8443/v1/chat?k=1#f") == "https://h.example:8443/v1/chat"


def test_config_key_is_never_shown(tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[expander]\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "{KEY}"\n')
    monkeypatch.setenv("KREA2KIT_CONFIG", str(cfg))
    from krea2kit.settings import load_settings

    settings = load_settings(cfg)
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    assert endpoint(settings).api_key == KEY
