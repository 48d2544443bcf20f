"""Bounded work for recipe input (issue 12): ``extends`` that names parents repeatedly reads
a capped number of files (it used to re-read them exponentially), chains are capped in
depth, and stdin (``run -``, ``--prompt -``) is read to the recipe size cap at most, so
an endless stream is refused instead of filling memory. Through the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from krea2kit.errors import EXIT_USAGE
from krea2kit.recipe.loader import MAX_EXTENDS_DEPTH, MAX_EXTENDS_FILES
from krea2kit.tomlfiles import MAX_RECIPE_BYTES


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def fan_out(tmp_path: Path, width: int, levels: int) -> Path:
    """level{i} extends level{i-1} ``width`` times; without a cap, loading the top reads
    ``width ** levels`` files."""
    write(tmp_path / "level0.toml", "seed = 11\n")
    for i in range(1, levels + 1):
        parents = ", ".join([f'"level{i - 1}.toml"'] * width)
        write(tmp_path / f"level{i}.toml", f"extends = [{parents}]\n")
    return write(tmp_path / "top.toml", f'extends = "level{levels}.toml"\nprompt = "x"\n')


def test_repeated_parents_stop_at_the_file_cap(cli_inproc, tmp_path):
    fan_out(tmp_path, width=4, levels=12)  # 4**12 = 16.7 million reads uncapped
    started = time.perf_counter()
    res = cli_inproc("recipe", "check", "top.toml")
    assert time.perf_counter() - started < 20  # an uncapped loader takes hours here
    assert res.code == EXIT_USAGE, res.stderr
    assert f"'extends' reads more than {MAX_EXTENDS_FILES} files in all" in res.stderr
    # the file whose 'extends' went over (which one depends on the order parents are read), the key
    assert re.search(rf"error: {re.escape(str(tmp_path))}/level\d+\.toml: extends: ", res.stderr), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    run = cli_inproc("run", "top.toml", "--dry-run")
    assert run.code == EXIT_USAGE and "extends" in run.stderr and run.stdout == ""


def test_a_shared_parent_under_the_cap_still_merges(cli_inproc, tmp_path):
    """A diamond (two parents sharing a grandparent) is ordinary use and keeps working."""
    fan_out(tmp_path, width=2, levels=4)  # 1 + 2 + 4 + 8 + 16 + 1 = 32 reads, under the cap
    res = cli_inproc("run", "top.toml", "--dry-run", "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["seed"] == 11


def test_extends_depth_is_capped(cli_inproc, tmp_path):
    write(tmp_path / "c0.toml", "seed = 2\n")
    for i in range(1, MAX_EXTENDS_DEPTH + 3):
        write(tmp_path / f"c{i}.toml", f'extends = "c{i - 1}.toml"\n')
    top = MAX_EXTENDS_DEPTH + 2
    write(tmp_path / "deep.toml", f'extends = "c{top}.toml"\nprompt = "x"\n')
    res = cli_inproc("recipe", "check", "deep.toml")
    assert res.code == EXIT_USAGE, res.stderr
    assert f"'extends' chains more than {MAX_EXTENDS_DEPTH} files deep" in res.stderr and ": extends:" in res.stderr
    # exactly at the depth limit is fine
    write(tmp_path / "ok.toml", f'extends = "c{MAX_EXTENDS_DEPTH - 1}.toml"\nprompt = "x"\n')
    ok = cli_inproc("run", "ok.toml", "--dry-run", "--json")
    assert ok.code == 0, ok.stderr
    assert json.loads(ok.stdout)["seed"] == 2


# --------------------------------------------------------------------------- stdin


def test_a_stdin_recipe_over_the_cap_is_refused(cli, cli_inproc):
    big = 'prompt = "x"\n#' + "x" * MAX_RECIPE_BYTES + "\n"
    for runner in (cli, cli_inproc):  # a byte stream (subprocess) and a text stream (in process)
        res = runner("run", "-", "--dry-run", input=big)
        assert res.code == EXIT_USAGE, res.stderr
        assert f"<stdin>: stdin holds more than {MAX_RECIPE_BYTES} bytes; expected the recipe" in res.stderr
        assert res.stdout == "" and "Traceback" not in res.stderr
    # a recipe of exactly the cap is read
    at_cap = 'prompt = "x"\nseed = 9\n#'
    at_cap += "x" * (MAX_RECIPE_BYTES - len(at_cap) - 1) + "\n"
    assert len(at_cap.encode()) == MAX_RECIPE_BYTES
    ok = cli("run", "-", "--dry-run", "--json", input=at_cap)
    assert ok.code == 0, ok.stderr
    assert json.loads(ok.stdout)["seed"] == 9


def test_prompts_from_stdin_over_the_cap_are_refused(cli_inproc, tmp_path):
    write(tmp_path / "r.toml", 'prompt = "x"\n')
    res = cli_inproc("run", "r.toml", "--prompt", "-", "--dry-run", input="a red fox\n" * (MAX_RECIPE_BYTES // 10 + 1))
    assert res.code == EXIT_USAGE, res.stderr
    assert "stdin holds more than" in res.stderr and "prompts for --prompt -" in res.stderr
    assert res.stdout == ""


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("args", [("run", "-", "--dry-run"), ("run", "--prompt", "-", "--dry-run")])
def test_an_endless_stdin_is_refused_without_reading_it_all(isolated_env, tmp_path, args):
    """``< /dev/zero`` never ends: reading all of it first would never return."""
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run([sys.executable, "-m", "krea2kit", *args], stdin=zero, capture_output=True, text=True,
                              env=isolated_env, cwd=str(tmp_path), timeout=60)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert f"stdin holds more than {MAX_RECIPE_BYTES} bytes" in proc.stderr and proc.stdout == ""
