"""Inputs that once ended in "internal error" or a hang, each refused with one clear message
before any weights load: recipe files that are not small regular files, deep nesting, seeds
past the range, loose types, a config path that is a folder, an audit log that cannot be
written; and values of environment variables never shown (the variable is named instead).

The malformed-recipe corpus (tests/recipe/malformed/) covers the cases a checked-in recipe
can show; these are the ones that need a FIFO, a big file, the environment or a config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from krea2kit.errors import EXIT_USAGE, EXIT_WEIGHTS, WeightsError
from krea2kit.tomlfiles import MAX_NESTING, MAX_RECIPE_BYTES
from krea2kit.recipe.schema import MAX_SEED

SECRET = "sk-live-7f3a9c1e5b2d4f60"  # looks like a token; must never reach a message


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def safetensors_bytes() -> bytes:
    """A minimal valid safetensors file (one float32 tensor), written without torch."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 4


# --------------------------------------------------------------------- recipe files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("where", ["extends", "top"])
def test_a_fifo_is_refused_without_blocking(cli, tmp_path, where):
    """Opening a FIFO for reading waits for a writer forever; it is refused from its stat."""
    os.mkfifo(tmp_path / "pipe.toml")
    write(tmp_path / "r.toml", 'extends = "pipe.toml"\nprompt = "x"\n')
    target = "r.toml" if where == "extends" else "pipe.toml"
    for args in (("recipe", "check", target), ("run", target, "--dry-run")):
        res = cli(*args, timeout=60)  # a regression hangs here, and the timeout fails the test
        assert res.code == EXIT_USAGE, res.stderr
        assert "is a FIFO (named pipe), not a recipe file" in res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
        if where == "extends":
            assert "r.toml: extends:" in res.stderr


def test_a_huge_parent_is_refused_before_it_is_read(cli_inproc, tmp_path):
    cli = cli_inproc
    big = tmp_path / "big.toml"
    with open(big, "wb") as fp:  # a valid comment line, just too long
        fp.write(b"#" + b"x" * MAX_RECIPE_BYTES + b"\n")
    write(tmp_path / "r.toml", 'extends = "big.toml"\nprompt = "x"\n')
    res = cli("recipe", "check", "r.toml")
    assert res.code == EXIT_USAGE
    assert f"r.toml: extends: {big} is {MAX_RECIPE_BYTES + 2} bytes" in res.stderr
    # a file at the limit is read as usual
    with open(big, "wb") as fp:
        fp.write(b'seed = 5\n#' + b"x" * (MAX_RECIPE_BYTES - 11) + b"\n")
    assert big.stat().st_size == MAX_RECIPE_BYTES
    ok = cli("run", "r.toml", "--dry-run", "--json")
    assert ok.code == 0, ok.stderr
    assert json.loads(ok.stdout)["seed"] == 5


def test_crlf_and_a_byte_order_mark_still_parse(cli_inproc, tmp_path):
    (tmp_path / "win.toml").write_bytes(b'\xef\xbb\xbfprompt = "x"\r\nseed = 4\r\n')
    res = cli_inproc("run", "win.toml", "--dry-run", "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["seed"] == 4


def test_deep_nesting_from_stdin_and_set(cli_inproc, tmp_path):
    cli = cli_inproc
    (tmp_path / "a.safetensors").write_bytes(safetensors_bytes())  # the [[loras]] file below is checked
    deep = "[" * 3000 + "]" * 3000
    res = cli("run", "-", "--dry-run", input=f'prompt = "x"\nv = {deep}\n')
    assert res.code == EXIT_USAGE and f"nested more than {MAX_NESTING} levels deep" in res.stderr
    assert "internal error" not in res.stderr
    res = cli("run", "--dry-run", "--set", f"plugins.x={deep}", "--prompt", "x")
    assert res.code == EXIT_USAGE and "--set: plugins.x:" in res.stderr and "nested" in res.stderr
    # a nesting real recipes use is fine
    ok = cli("run", "-", "--dry-run", input='prompt = "x"\n[[loras]]\npath = "a.safetensors"\nsteps = [0, 4]\n')
    assert ok.code == 0, ok.stderr


# --------------------------------------------------------------------- seeds and types


def test_seed_range_edges(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "r.toml", 'prompt = "x"\n')
    last = cli("run", "r.toml", "--dry-run", "--json", "--set", f"seed={MAX_SEED - 2}", "--set", "count=3")
    assert last.code == 0, last.stderr
    assert [json.loads(line)["seed"] for line in last.stdout.splitlines()] == [MAX_SEED - 2, MAX_SEED - 1, MAX_SEED]
    past = cli("run", "r.toml", "--dry-run", "--set", f"seed={MAX_SEED - 2}", "--set", "count=4")
    assert past.code == EXIT_USAGE and past.stdout == ""
    assert "--set: seed:" in past.stderr and f"use a seed of at most {MAX_SEED - 3}" in past.stderr
    neg = cli("recipe", "check", "r.toml", "--set", "seed=-1")
    assert neg.code == EXIT_USAGE and "seed: input should be greater than or equal to 0" in neg.stderr


def test_set_keeps_toml_literal_types(cli_inproc, tmp_path):
    """--set values are TOML literals: seed=7 is an integer, guidance=3 an integer accepted
    as a float; a quoted number stays a string and is refused where a number belongs."""
    cli = cli_inproc
    write(tmp_path / "r.toml", 'prompt = "x"\n')
    res = cli("run", "r.toml", "--dry-run", "--json", "--set", "seed=7", "--set", "width=64",
              "--set", "sampler.guidance=3", "--set", "sampler.steps=2")
    assert res.code == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["seed"] == 7 and row["width"] == 64
    shown = json.loads(cli("recipe", "show", "r.toml", "--json", "--set", "sampler.guidance=3").stdout)
    assert shown["sampler"]["guidance"] == 3.0
    bad = cli("recipe", "check", "r.toml", "--set", "seed='7'")
    assert bad.code == EXIT_USAGE and "--set: seed: input should be a valid integer, got '7'" in bad.stderr


def test_a_long_wrong_value_is_quoted_only_in_part(cli_inproc, tmp_path):
    write(tmp_path / "r.toml", f'prompt = "x"\nwidth = "{"9" * 5000}"\n')
    res = cli_inproc("recipe", "check", "r.toml")
    assert res.code == EXIT_USAGE and "r.toml: width: input should be a valid integer" in res.stderr
    assert len(res.stderr) < 300


# --------------------------------------------------------------------- user config


def test_config_path_that_is_a_folder(cli_inproc, tmp_path):
    cli = cli_inproc
    folder = tmp_path / f"conf-{SECRET}"
    folder.mkdir()
    write(tmp_path / "r.toml", 'prompt = "x"\n')
    for args in (("run", "r.toml", "--dry-run"), ("recipe", "check", "r.toml"), ("config",)):
        res = cli(*args, env={"KREA2KIT_CONFIG": str(folder)})
        assert res.code == EXIT_USAGE, (args, res.stderr)
        assert "$KREA2KIT_CONFIG: the config file is a folder, not a TOML file" in res.stderr
        assert SECRET not in res.stderr and "Traceback" not in res.stderr


def test_config_types_are_strict(cli_inproc, tmp_path):
    """A deployer switch is a boolean: "no" is refused, not read as true."""
    write(tmp_path / "config.toml", '[safety]\nunfiltered = "no"\n')
    res = cli_inproc("config")
    assert res.code == EXIT_USAGE and "safety.unfiltered: input should be a valid boolean" in res.stderr


# --------------------------------------------------------------------- audit log


def _run_tiny(cli, tmp_path, env=None):
    write(tmp_path / "r.toml", 'prompt = "a red circle"\nwidth = 64\nheight = 64\n[sampler]\nsteps = 1\n'
                               '[output]\ndir = "out"\n')
    return cli("run", "r.toml", env=env)


def test_unwritable_audit_log_stops_the_run_before_anything_loads(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "blocker", "a file where the log's folder should be\n")
    log = tmp_path / "blocker" / "logs" / "audit.jsonl"
    write(tmp_path / "config.toml", f'[safety]\naudit_log = "{log.as_posix()}"\n')
    res = _run_tiny(cli, tmp_path)
    assert res.code == EXIT_USAGE, res.stderr
    assert f"{log}: cannot write the content-filter audit log: {tmp_path / 'blocker'} is a file" in res.stderr
    assert "audit_log" in res.stderr  # the hint names the setting that fixes it
    assert "loading" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_default_audit_log_under_cache_dir_names_the_variable(cli_inproc, tmp_path):
    write(tmp_path / "blocker", "")
    cache = tmp_path / "blocker" / SECRET
    res = _run_tiny(cli_inproc, tmp_path, env={"KREA2KIT_CACHE_DIR": str(cache)})
    assert res.code == EXIT_USAGE, res.stderr
    assert "$KREA2KIT_CACHE_DIR/audit.jsonl: cannot write the content-filter audit log" in res.stderr
    assert SECRET not in res.stderr


def test_audit_log_lost_mid_run_fails_closed_with_a_clear_error(tmp_path):
    from krea2kit.safety.audit import AuditLog, AuditLogError
    from krea2kit.safety.verdict import Decision

    log = AuditLog(tmp_path / "logs" / "audit.jsonl")
    log.check_writable()
    assert log.path.is_file() and log.path.read_text() == ""
    log.path.unlink()
    log.path.parent.rmdir()
    write(tmp_path / "logs", "now a file")
    with pytest.raises(AuditLogError) as err:
        log.record("run", "prompt", "a cat", Decision("prompt", ()))
    assert str(log.path) in str(err.value) and "stopped without writing" in str(err.value)


# --------------------------------------------------------------------- env values


def test_recipe_env_value_is_never_shown(cli_inproc, tmp_path):
    """{env = "VAR"} pointing at a missing file: the progress line and the error name $VAR."""
    secret_path = tmp_path / SECRET / "text_encoder"
    write(tmp_path / "r.toml", 'prompt = "a red circle"\nwidth = 64\nheight = 64\n'
                               '[model.weights]\ntext_encoder = { env = "MY_TEXT_ENCODER" }\n'
                               '[output]\ndir = "out"\n')
    res = cli_inproc("run", "r.toml", env={"MY_TEXT_ENCODER": str(secret_path)})
    assert res.code == EXIT_WEIGHTS, res.stderr
    assert "from $MY_TEXT_ENCODER (recipe)" in res.stderr
    assert "$MY_TEXT_ENCODER" in res.stderr.split("error:", 1)[1]
    assert SECRET not in res.stderr and SECRET not in res.stdout


def test_preset_env_value_is_never_shown(monkeypatch, tmp_path):
    """$OSS_TURBO is where the official Turbo file lives; a missing file is reported as
    "$OSS_TURBO", by the same loader a run uses."""
    from krea2kit.locate import locate_weights
    from krea2kit.models.weights import open_checkpoint
    from krea2kit.plugins import Host
    from krea2kit.settings import Settings

    turbo = Host(load_entry_points=False).registry.get("model", "krea2-turbo")
    secret_path = tmp_path / SECRET / "turbo.safetensors"
    monkeypatch.setenv("OSS_TURBO", str(secret_path))
    location, how = locate_weights(turbo, "dit", None, Settings())
    assert how == "$OSS_TURBO"
    with pytest.raises(WeightsError) as err:
        open_checkpoint(location, what="transformer weights")
    text = str(err.value)
    assert text.startswith("$OSS_TURBO: transformer weights not found") and SECRET not in text


def test_env_values_hides_every_form_of_a_value(monkeypatch, tmp_path):
    from krea2kit import env_values

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KREA2KIT_TEST_SECRET_DIR", f"{SECRET}/models")
    assert env_values.from_env("KREA2KIT_TEST_SECRET_DIR") == f"{SECRET}/models"
    absolute = str(Path(f"{SECRET}/models").absolute())
    assert env_values.hide(f"no file {absolute}/x.safetensors") == "no file $KREA2KIT_TEST_SECRET_DIR/x.safetensors"
    assert env_values.hide(f"{SECRET}/models") == "$KREA2KIT_TEST_SECRET_DIR"
    monkeypatch.setenv("KREA2KIT_TEST_SHORT", "ab")  # too short to hide without garbling messages
    env_values.from_env("KREA2KIT_TEST_SHORT")
    assert env_values.hide("about a tab") == "about a tab"


@pytest.mark.skipif(sys.platform == "win32", reason="/dev/zero")
def test_read_text_file_refuses_devices_by_kind():
    from krea2kit.tomlfiles import NotARegularFile, read_text_file

    with pytest.raises(NotARegularFile) as err:
        read_text_file(Path("/dev/zero"))
    assert err.value.kind == "a character device"
