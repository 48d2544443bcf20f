"""The recipe language through the real CLI: extends, provenance, --set, stdin, show,
schema, prompts on stdin, dry runs."""

from __future__ import annotations

import json
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def write(path, text):
    path.write_text(text)
    return path


def test_extends_merges_tables_and_replaces_arrays(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "base.toml", 'seed = 5\nnegative = "blurry"\n[sampler]\nsteps = 3\nname = "heun"\n'
                                  '[[prompts]]\ntext = "base prompt"\n')
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "child.toml", 'extends = "../base.toml"\n[sampler]\nsteps = 6\n'
                                           '[[prompts]]\ntext = "child prompt"\ncount = 2\n')
    res = cli("recipe", "show", "sub/child.toml", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["seed"] == 5 and data["negative"] == "blurry"
    assert data["sampler"]["steps"] == 6 and data["sampler"]["name"] == "heun"  # merged key by key
    assert [p["text"] for p in data["prompts"]] == ["child prompt"]  # arrays replaced whole


def test_error_in_a_parent_names_the_parent_file(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "base.toml", '[sampler]\nsteps = "many"\n')
    write(tmp_path / "child.toml", 'extends = "base.toml"\nprompt = "x"\n')
    res = cli("recipe", "check", "child.toml")
    assert res.code == 2
    assert "base.toml: sampler.steps:" in res.stderr and "child.toml" not in res.stderr


def test_set_overrides_are_typed_and_validated(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "r.toml", 'prompt = "x"\n')
    res = cli("recipe", "show", "r.toml", "--json", "--set", "sampler.steps=4", "--set", "model.device=cpu",
              "--set", "seed=11", "--set", 'negative="a, b"')
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["sampler"]["steps"] == 4 and data["model"]["device"] == "cpu" and data["seed"] == 11
    assert data["negative"] == "a, b"
    bad = cli("recipe", "check", "r.toml", "--set", "sampler.steps=abc")
    assert bad.code == 2 and "--set: sampler.steps:" in bad.stderr and "valid integer" in bad.stderr
    typo = cli("recipe", "check", "r.toml", "--set", "sampler.stpes=3")
    assert typo.code == 2 and "did you mean 'steps'" in typo.stderr
    malformed = cli("recipe", "check", "r.toml", "--set", "novalue")
    assert malformed.code == 2 and "KEY=VALUE" in malformed.stderr


def test_recipe_from_stdin(cli_inproc):
    cli = cli_inproc
    res = cli("recipe", "show", "-", "--json", input='prompt = "from stdin"\n[sampler]\nsteps = 2\n')
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["prompt"] == "from stdin"
    bad = cli("recipe", "check", "-", input="prompt = \n")
    assert bad.code == 2 and "<stdin>" in bad.stderr and "invalid TOML" in bad.stderr


def test_show_applies_preset_defaults_and_round_trips_as_toml(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "r.toml", 'prompt = "x"\n[model]\npreset = "krea2-raw"\n')
    res = cli("recipe", "show", "r.toml")
    assert res.code == 0, res.stderr
    data = tomllib.loads(res.stdout)
    assert data["sampler"]["steps"] == 52 and data["sampler"]["guidance"] == 3.5
    assert data["sampler"]["mu"] == "auto" and data["sampler"]["name"] == "euler"
    assert data["width"] == 1024 and data["model"]["preset"] == "krea2-raw"
    turbo = cli("recipe", "show", "r.toml", "--json", "--set", 'model.preset="krea2-turbo"')
    t = json.loads(turbo.stdout)["sampler"]
    assert t["steps"] == 8 and t["guidance"] == 0.0 and t["mu"] == 1.15
    # the printed TOML is itself a valid recipe that resolves to the same thing
    write(tmp_path / "shown.toml", res.stdout)
    again = cli("recipe", "show", "shown.toml")
    assert tomllib.loads(again.stdout) == data


def test_standard_convention_keeps_the_number_the_user_wrote(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "r.toml", 'prompt = "x"\n[model]\npreset = "krea2-raw"\n[sampler]\nconvention = "standard"\n')
    data = json.loads(cli("recipe", "show", "r.toml", "--json").stdout)
    assert data["sampler"]["guidance"] == 4.5  # Raw's Krea g = 3.5 is standard s = 4.5


def test_schema_is_json_schema_with_every_table(cli_inproc):
    cli = cli_inproc
    res = cli("recipe", "schema")
    assert res.code == 0
    schema = json.loads(res.stdout)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    for key in ("schema", "extends", "prompt", "prompts", "model", "sampler", "loras", "sliders", "safety",
                "output", "plugins", "seed", "count", "width", "height", "negative"):
        assert key in schema["properties"], key


def test_dry_run_plans_seeds_and_sizes(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "r.toml", 'seed = 100\ncount = 2\nwidth = 512\nheight = 512\n'
                               '[[prompts]]\ntext = "a"\n[[prompts]]\ntext = "b"\nseed = 7\ncount = 3\nwidth = 256\n')
    res = cli("run", "r.toml", "--dry-run", "--json")
    assert res.code == 0, res.stderr
    jobs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(j["prompt"], j["seed"], j["width"], j["height"]) for j in jobs] == [
        ("a", 100, 512, 512), ("a", 101, 512, 512), ("b", 7, 256, 512), ("b", 8, 256, 512), ("b", 9, 256, 512)]
    assert [j["index"] for j in jobs] == list(range(5))


def test_prompts_from_stdin_lines_and_json_lines(cli_inproc, tmp_path):
    cli = cli_inproc
    res = cli("run", "--dry-run", "--json", "--prompt", "-",
              input='a red cube\n# no comment: a prompt\n\n{"prompt": "a blue ball"}\n')
    assert res.code == 0, res.stderr
    assert [json.loads(line)["prompt"] for line in res.stdout.splitlines()] == [
        "a red cube", "# no comment: a prompt", "a blue ball"]  # the one rule: README "Prompts from stdin"
    bad = cli("run", "--dry-run", "--prompt", "-", input='{"text": 5}\n')
    assert bad.code == 2 and "line 1" in bad.stderr
    both = cli("run", "-", "--prompt", "-", input="")
    assert both.code == 2 and "stdin" in both.stderr


def test_env_indirection_resolves_weights(cli_inproc, tmp_path):
    cli = cli_inproc
    write(tmp_path / "r.toml", 'prompt = "x"\n[model.weights]\ndit = { env = "MY_DIT", default = "/d" }\n')
    assert cli("recipe", "check", "r.toml").code == 0
    assert cli("recipe", "check", "r.toml", env={"MY_DIT": "/elsewhere"}).code == 0


def test_config_command_shows_location_and_values(cli_inproc, tmp_path, isolated_env):
    cli = cli_inproc
    res = cli("config", "--path")
    assert res.stdout.strip() == isolated_env["KREA2KIT_CONFIG"]
    write(tmp_path / "config.toml", 'default_model = "krea2-raw"\n[weights.krea2-turbo]\ndit = "/models/turbo.safetensors"\n')
    shown = json.loads(cli("config", "--json").stdout)
    assert shown["exists"] is True and shown["settings"]["default_model"] == "krea2-raw"
    assert shown["settings"]["weights"]["krea2-turbo"]["dit"] == "/models/turbo.safetensors"
    write(tmp_path / "r.toml", 'prompt = "x"\n')
    data = json.loads(cli("recipe", "show", "r.toml", "--json").stdout)
    assert data["model"]["preset"] == "krea2-raw"  # the user's default model
    write(tmp_path / "config.toml", 'default_modle = "x"\n')
    bad = cli("config")
    assert bad.code == 2 and "did you mean 'default_model'" in bad.stderr
    # The config came from $KREA2KIT_CONFIG: the message names the variable, not its value.
    assert "$KREA2KIT_CONFIG: default_modle:" in bad.stderr
    assert isolated_env["KREA2KIT_CONFIG"] not in bad.stderr
