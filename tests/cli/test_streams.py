"""stdin, stdout and the environment, through the real CLI: one stdout line per image whatever
a prompt or path holds, the one `--prompt -` rule, UTF-8 stdin, a closed stdout (`| head -1`),
NO_COLOR as no-color.org defines it, and `python -m krea2kit` not running files from the
working directory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
seed = 3
width = 64
height = 64
prompt = "a red circle on a white background"
[sampler]
steps = 2
[output]
dir = "out"
name = "img-{index:02d}-{seed}"
"""

HOSTILE = "line one\nline two \x1b[31mred\x1b[0m\rback\u2028sep"


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    return "r.toml"


def bytes_stdin(monkeypatch, data: bytes) -> None:
    """Replace stdin by a real text stream over ``data`` (it has a .buffer, like a pipe)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


# --------------------------------------------------------------------------- stdout lines
def test_dry_run_prints_one_escaped_line_per_image(cli_inproc, recipe):
    res = cli_inproc("run", recipe, "--dry-run", "--prompt", HOSTILE, "--set", "count=2")
    assert res.code == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 3  # two images, two lines
    for line in lines[:2]:
        assert "\x1b" not in line and "\r" not in line and "\u2028" not in line
        assert line.endswith("\tline one\\nline two \\x1b[31mred\\x1b[0m\\rback\\u2028sep")
    as_json = cli_inproc("run", recipe, "--dry-run", "--json", "--prompt", HOSTILE)
    assert as_json.code == 0
    (line,) = as_json.stdout.splitlines()  # str.splitlines also breaks at \r and \u2028
    assert json.loads(line)["prompt"] == HOSTILE  # JSON keeps the exact text


def test_a_written_path_is_one_escaped_line(cli_inproc, recipe, tmp_path):
    # C0 controls are refused in output.dir at plan time; these line breaks pass that check
    res = cli_inproc("run", recipe, "-q", "--set", 'output.dir="o\\u2028x\\u0085y"')
    assert res.code == 0, res.stderr
    (line,) = res.stdout.splitlines()  # str.splitlines breaks at both
    assert line == "o\\u2028x\\x85y/img-00-3.png"
    assert (tmp_path / "o\u2028x\x85y" / "img-00-3.png").is_file()
    as_json = cli_inproc("run", recipe, "-q", "--json", "--set", 'output.dir="o\\u2028x\\u0085y"')
    (line,) = as_json.stdout.splitlines()
    assert json.loads(line)["path"] == "o\u2028x\x85y/img-00-3-2.png"


# --------------------------------------------------------------------------- --prompt -
def _planned(res) -> list[dict]:
    assert res.code == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_stdin_prompts_follow_one_rule(cli_inproc, recipe):
    stdin = ("# not a comment: a prompt\n"
             "\n"
             '  {"prompt": "a fox", "negative": "blurry", "seed": 40, "count": 2, "width": 32, "height": 48}\n'
             '{"text": "{braces} kept", "name": "b"}\n'
             "   plain words   \n")
    jobs = _planned(cli_inproc("run", recipe, "--dry-run", "--json", "--prompt", "-", input=stdin))
    assert [j["prompt"] for j in jobs] == ["# not a comment: a prompt", "a fox", "a fox", "{braces} kept",
                                          "plain words"]
    assert [j["seed"] for j in jobs] == [3, 40, 41, 3, 3]
    assert [j["negative"] for j in jobs] == ["", "blurry", "blurry", "", ""]
    assert [(j["width"], j["height"]) for j in jobs] == [(64, 64), (32, 48), (32, 48), (64, 64), (64, 64)]


@pytest.mark.parametrize(("line", "says"), [
    ('{"prompt": "a", "sead": 4}', "unknown key 'sead'"),
    ('{"prompt": "a", "seed": true}', "seed"),
    ('{"prompt": "a", "width": "64"}', "width"),
    ('{"prompt": "a", "count": 0}', "count"),
    ('{"negative": "b"}', "no 'prompt'"),
    ('{"prompt": "a", "text": "b"}', "both 'prompt' and 'text'"),
    ('{"prompt": "a", "prompt": "b"}', "appears twice"),
    ("{a prompt in braces}", "not valid JSON"),
    ('{"prompt": ["a"]}', "prompt"),
])
def test_stdin_record_errors_name_the_line(cli_inproc, recipe, line, says):
    res = cli_inproc("run", recipe, "--dry-run", "--prompt", "-", input=f"first prompt\n\n{line}\n")
    assert res.code == 2, res.stderr
    assert "<stdin>: line 3:" in res.stderr and says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    if "JSON" in says:
        assert 'as a record: {"prompt": "{a prompt in braces}"}' in res.stderr


@pytest.mark.parametrize("args", [("run", "r.toml", "--dry-run", "--prompt", "-"), ("run", "-", "--dry-run"),
                                  ("recipe", "check", "-")])
def test_non_utf8_stdin_is_a_usage_error(cli_inproc, recipe, monkeypatch, args):
    bytes_stdin(monkeypatch, b"a caf\xe9 at night\n")
    res = cli_inproc(*args)
    assert res.code == 2, res.stderr
    assert "stdin is not UTF-8" in res.stderr and "0xe9" in res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr


def test_utf8_stdin_with_a_byte_order_mark(cli_inproc, recipe, monkeypatch):
    bytes_stdin(monkeypatch, "\ufeffun café\n".encode())
    jobs = _planned(cli_inproc("run", recipe, "--dry-run", "--json", "--prompt", "-"))
    assert [j["prompt"] for j in jobs] == ["un café"]


# --------------------------------------------------------------------------- closed stdout
@pytest.mark.slow
def test_closed_stdout_stops_the_run_at_once_quietly(isolated_env, recipe, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "krea2kit", "run", recipe, "--set", "count=6", "--set", "sampler.steps=8"],
        cwd=tmp_path, env=isolated_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline().decode().strip()  # what `head -1` reads...
    proc.stdout.close()  # ...before it exits
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "error" not in err.lower()
    assert first == "out/img-00-3.png"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["img-00-3.png"]  # no image rendered for a reader that is gone


@pytest.mark.slow
def test_closed_stdout_through_a_shell_pipe(isolated_env, recipe, tmp_path):
    script = f'"{sys.executable}" -m krea2kit run {recipe} --set count=4 | head -1; echo "rc=${{PIPESTATUS[0]}}"'
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=isolated_env, capture_output=True, text=True,
                         timeout=300)
    assert res.stdout.splitlines() == ["out/img-00-3.png", "rc=141"], res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr


# --------------------------------------------------------------------------- colour
@pytest.mark.parametrize(("no_color", "coloured"), [("", True), ("1", False)])
def test_empty_no_color_leaves_colour_on(cli_inproc, recipe, no_color, coloured):
    # FORCE_COLOR stands in for a terminal; "error:" is bold, and red (SGR 31) only with colour
    res = cli_inproc("run", recipe, "--dry-run", "--set", "sampler.steps=0",
                     env={"NO_COLOR": no_color, "FORCE_COLOR": "1"})
    assert res.code == 2 and "\x1b[" in res.stderr
    assert ("31m" in res.stderr) is coloured, res.stderr


# --------------------------------------------------------------------------- python -m
@pytest.mark.parametrize("module", ["click", "rich", "pluggy", "json"])
def test_python_m_does_not_import_modules_from_the_working_directory(isolated_env, tmp_path, module):
    marker = tmp_path / "PWNED"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(99)\n")
    for args in (["--help"], ["plugins"], ["run", "--help"]):
        res = subprocess.run([sys.executable, "-m", "krea2kit", *args], cwd=tmp_path, env=isolated_env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert not marker.exists(), f"{module}.py from the working directory ran"
    assert "krea2kit" in res.stdout and Path(tmp_path / f"{module}.py").exists()
