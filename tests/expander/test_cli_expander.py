"""``[expander]`` end to end through the real CLI on the nano model, against the stand-in
OpenAI-compatible server: both prompts in the JSON output and the image metadata, the key in
neither, the cache (offline re-run), ``run IMAGE.png`` (the recorded expansion, no endpoint),
failures (exit 5 or the prompt as written), the prompt filters before and after expansion,
per-prompt switches, the system prompt file and what an image's recipe may set."""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stand_in_server import KEY

from krea2kit.output.metadata import read_image_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
seed = 3
width = 64
height = 64
prompt = "a red circle"
[sampler]
steps = 2
[output]
dir = "out"
name = "img-{index}"
[expander]
enabled = true
seed = 11
temperature = 0.0
max_tokens = 300
"""
EXPANDED = "A detailed photograph of a red circle, in soft morning light."
MARKER = "zzmarkerzz"


def records(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    return "r.toml"


def no_key_anywhere(res, tmp_path: Path) -> None:
    assert KEY not in res.stdout and KEY not in res.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < (8 << 20):
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow  # three nano runs
def test_expanded_run_cache_and_image_rerun(cli_inproc, endpoint_env, recipe, tmp_path, monkeypatch):
    server = endpoint_env
    res = cli_inproc("run", recipe, "--json")
    assert res.code == 0, res.stderr
    (rec,) = records(res)
    assert rec["prompt"] == EXPANDED and rec["original_prompt"] == "a red circle"
    assert rec["expansion"]["source"] == "model" and rec["expansion"]["backend"] == "openai"
    assert rec["expansion"]["identity"] == "openai:stand-in-model"
    (req,) = server.requests
    assert req["body"]["messages"][1]["content"] == "a red circle"
    assert (req["body"]["seed"], req["body"]["temperature"], req["body"]["max_tokens"]) == (11, 0.0, 300)
    assert "expanded prompt: " + EXPANDED in res.stderr
    meta = read_image_metadata(rec["path"])
    entry = meta["krea2kit"]["expander"]
    assert (entry["original"], entry["expanded"], entry["source"]) == ("a red circle", EXPANDED, "model")
    assert entry["system_prompt"] == "krea2kit" and len(entry["system_prompt_sha256"]) == 64
    assert meta["krea2kit"]["recipe"]["prompt"] == "a red circle"  # the image's recipe: the prompt as written
    assert meta["parameters"].startswith(EXPANDED)  # A1111 readers see what was rendered
    no_key_anywhere(res, tmp_path)
    first = pixels(rec["path"])

    # The endpoint goes away: the cached answer makes the same image, offline.
    server.stop()
    res = cli_inproc("run", recipe, "--json")
    assert res.code == 0, res.stderr
    (again,) = records(res)
    assert again["prompt"] == EXPANDED and again["expansion"]["source"] == "cache"
    assert np.array_equal(pixels(again["path"]), first)

    # `run IMAGE.png` with an empty cache and no endpoint at all: the expansion the image records.
    monkeypatch.setenv("KREA2KIT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    for name in ("KREA2KIT_EXPANDER_BASE_URL", "KREA2KIT_EXPANDER_API_KEY"):
        monkeypatch.delenv(name)
    res = cli_inproc("run", rec["path"], "--json")
    assert res.code == 0, res.stderr
    (rerun,) = records(res)
    assert rerun["prompt"] == EXPANDED and rerun["original_prompt"] == "a red circle"
    assert rerun["expansion"]["source"] == "image"
    assert np.array_equal(pixels(rerun["path"]), first)

    # --no-expander-cache (cache = "refresh") asks again: with no endpoint that is exit 5, naming the fix
    res = cli_inproc("run", recipe, "--no-expander-cache")
    assert res.code == 5 and "no prompt expander endpoint" in res.stderr and "Traceback" not in res.stderr


def test_failures_stop_or_fall_back(cli_inproc, endpoint_env, recipe, tmp_path):
    server = endpoint_env
    server.mode = "empty"
    res = cli_inproc("run", recipe, "--json")
    assert res.code == 5, res.stderr
    # the endpoint is named as the variable that set it (krea2kit.env_values: env values are never shown)
    assert "empty answer" in res.stderr and "$KREA2KIT_EXPANDER_BASE_URL/chat/completions" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 2  # one line, and its hint
    assert not (tmp_path / "out").exists() and "Traceback" not in res.stderr
    server.stop()
    res = cli_inproc("run", recipe, "--json")
    assert res.code == 5 and "cannot connect" in res.stderr and KEY not in res.stderr
    res = cli_inproc("run", recipe, "--json", "--set", 'expander.on_failure="original"')
    assert res.code == 0, res.stderr
    (rec,) = records(res)
    assert rec["prompt"] == "a red circle" and rec["expansion"]["source"] == "original"
    assert "keeping the prompt as written" in res.stderr
    assert read_image_metadata(rec["path"])["krea2kit"]["expander"]["expanded"] is None


@pytest.fixture
def marker_filter():
    """A prompt filter that blocks any text containing MARKER, registered in this process."""
    from krea2kit.hookspecs import hookimpl
    from krea2kit.plugins import Host, reset_host
    from krea2kit.registry import FilterDescriptor
    from krea2kit.safety.verdict import Verdict

    class Marker:
        name, version = "marker", "1"

        def check_prompt(self, text):
            if MARKER in text:
                return Verdict(self.name, self.version, "block", "test/marker", 1.0, "the marker word")
            return Verdict(self.name, self.version, "allow")

    module = types.ModuleType("marker_filter")
    module.register_filters = hookimpl(lambda register: register(FilterDescriptor(
        name="marker", summary="blocks a marker word", load=lambda options, context: Marker(), target="prompt")))
    reset_host(Host(load_entry_points=False, extra_plugins=((module, "marker"),)))
    yield
    reset_host(None)


def test_prompt_filters_run_before_and_after_expansion(cli_inproc, endpoint_env, recipe, marker_filter):
    server = endpoint_env
    server.answer = lambda prompt: f"{prompt} with a {MARKER} painted on it"
    res = cli_inproc("run", recipe, "--json")
    assert res.code == 3, res.stderr  # the expansion added what the filter blocks
    (rec,) = records(res)
    assert rec["status"] == "blocked" and rec["blocked_by"] == ["marker"] and len(server.requests) == 1
    res = cli_inproc("run", recipe, "--json", "--prompt", f"a {MARKER} sign")
    assert res.code == 3 and records(res)[0]["status"] == "blocked"
    assert len(server.requests) == 1  # blocked as written: never sent to the model


def test_per_prompt_switch_and_system_prompt_file(cli_inproc, endpoint_env, tmp_path):
    server = endpoint_env
    (tmp_path / "mine.txt").write_text("Write a haiku about the picture.\n")
    (tmp_path / "r.toml").write_text(RECIPE.replace('prompt = "a red circle"\n', "") + """
system_prompt = "mine.txt"
[[prompts]]
text = "a blue square"
[[prompts]]
text = "a green dot"
expand = false
""")
    res = cli_inproc("run", "r.toml", "--json")
    assert res.code == 0, res.stderr
    first, second = records(res)
    assert first["original_prompt"] == "a blue square" and first["prompt"].startswith("A detailed photograph")
    assert second["prompt"] == "a green dot" and "original_prompt" not in second and "expansion" not in second
    (req,) = server.requests
    assert req["body"]["messages"][0]["content"] == "Write a haiku about the picture."
    meta = read_image_metadata(first["path"])["krea2kit"]
    assert meta["expander"]["system_prompt"] == "mine.txt"
    assert meta["recipe"]["expander"]["system_prompt"] == "mine.txt"  # a file name, never its folder
    assert read_image_metadata(second["path"])["krea2kit"]["recipe"]["expander"]["enabled"] is False
    res = cli_inproc("run", "r.toml", "--dry-run", "--set", 'expander.system_prompt="missing.txt"')
    assert res.code == 2 and "expander.system_prompt" in res.stderr and "not found" in res.stderr
    res = cli_inproc("run", "r.toml", "--dry-run", "--set", 'expander.backend="opneai"')
    assert res.code == 2 and "did you mean 'openai'" in res.stderr.lower()


def test_private_prompts_keep_both_texts_out(cli_inproc, endpoint_env, recipe):
    res = cli_inproc("run", recipe, "--json", "--set", "output.include_prompt=false")
    assert res.code == 0, res.stderr
    (rec,) = records(res)
    assert rec["prompt"] is None and rec["original_prompt"] is None
    meta = read_image_metadata(rec["path"])
    assert "original" not in meta["krea2kit"]["expander"] and "expanded" not in meta["krea2kit"]["expander"]
    assert "red circle" not in json.dumps(meta)


def test_an_image_recipe_cannot_name_a_system_prompt_file():
    from krea2kit.recipe.trust import untrusted_recipe

    kept, dropped = untrusted_recipe({"prompt": "x", "expander": {
        "enabled": True, "backend": "openai", "seed": 4, "temperature": 0.5, "max_tokens": 100,
        "on_failure": "original", "system_prompt": "/etc/passwd", "cache": "refresh"}})
    assert kept["expander"] == {"enabled": True, "backend": "openai", "seed": 4, "temperature": 0.5,
                                "max_tokens": 100, "on_failure": "original"}
    assert set(dropped) == {"expander.system_prompt", "expander.cache"}


def test_contract_check_of_the_builtin_backends(stand_in):
    from krea2kit.plugins import Host
    from krea2kit.settings import Settings
    from krea2kit.testing import OK, SKIP, check_part

    host = Host(load_entry_points=False)
    openai = host.registry.get("prompt_expander", "openai")
    assert check_part(openai, registry=host.registry, settings=Settings()).status == SKIP  # no endpoint set
    stand_in.key = None
    settings = Settings.model_validate({"expander": {"base_url": stand_in.base_url}})
    result = check_part(openai, registry=host.registry, settings=settings)
    assert result.status == OK, result.detail
    assert stand_in.requests[0]["body"]["max_tokens"] == 64
    # the nano preset's text encoder cannot generate: skipped with the reason, not failed
    local = check_part(host.registry.get("prompt_expander", "transformers"), registry=host.registry,
                       settings=Settings())
    assert local.status == SKIP and "lm_head.weight" in local.detail, local.detail


def test_listing_imports_neither_torch_nor_transformers(isolated_env):
    import subprocess
    import sys

    code = ("import sys; from krea2kit.cli import main\n"
            "try: main(['plugins'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=isolated_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "prompt_expander: openai, transformers" in proc.stdout


def test_cache_entries_are_keyed_and_damaged_ones_dropped(tmp_path):
    from krea2kit.expander.cache import ExpansionCache, cache_key

    args = dict(backend="openai", identity="openai:m", system_prompt_sha256="0" * 64, prompt="p", seed=1,
                temperature=0.0, max_tokens=10)
    key = cache_key(**args)
    assert key != cache_key(**{**args, "seed": 2}) and key != cache_key(**{**args, "system_prompt_sha256": "1" * 64})
    cache = ExpansionCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, "expanded text", about={"prompt": "p"})
    assert cache.get(key) == "expanded text"
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None and not cache.path(key).exists()
    digest = hashlib.sha256(b"x").hexdigest()
    assert ExpansionCache(tmp_path).get(digest) is None


def test_no_expander_cache_asks_again(cli_inproc, endpoint_env, recipe):
    server = endpoint_env
    assert cli_inproc("run", recipe, "-q").code == 0
    assert cli_inproc("run", recipe, "-q").code == 0
    assert len(server.requests) == 1  # the second run took the cached answer
    server.answer = lambda prompt: f"{prompt}, painted in oils"
    res = cli_inproc("run", recipe, "--json", "--no-expander-cache")
    assert res.code == 0 and len(server.requests) == 2
    assert records(res)[0]["prompt"] == "a red circle, painted in oils"
    res = cli_inproc("run", recipe, "--json")  # the refreshed answer replaced the cached one
    assert records(res)[0]["prompt"] == "a red circle, painted in oils" and len(server.requests) == 2


def test_dry_run_warns_when_no_endpoint_is_set(cli_inproc, recipe, monkeypatch):
    for name in ("KREA2KIT_EXPANDER_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    res = cli_inproc("run", recipe, "--dry-run")
    assert res.code == 0 and "no prompt expander endpoint is set" in res.stderr and "exit 5" in res.stderr
    assert "KREA2KIT_EXPANDER_BASE_URL" in res.stderr  # the fix
