"""The plugin host through the real CLI: entry points, broken and clashing plugins,
strict mode, selection, misspelled hooks, and the `plugins --json` contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from plugin_factory import make_plugin

GOOD = """
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import SamplerDescriptor

def _load():
    from krea2kit.sampling import SAMPLERS
    return SAMPLERS["euler"]

@hookimpl
def register_samplers(register):
    register(SamplerDescriptor(name="good-sampler", summary="test sampler", load=_load))
"""

BROKEN = """
raise ImportError("this plugin needs a library that is not installed")
"""

CLASH = """
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import SamplerDescriptor

@hookimpl
def register_samplers(register):
    register(SamplerDescriptor(name="euler", summary="another euler", load=lambda: None))
"""

TYPO = """
from krea2kit.hookspecs import hookimpl

@hookimpl
def register_sampler(register):  # misspelled: the hook is register_samplers
    pass
"""

RAISES = """
from krea2kit.hookspecs import hookimpl

@hookimpl
def register_samplers(register):
    raise RuntimeError("boom while registering")
"""

WRONG_TYPE = """
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import VAEDescriptor

@hookimpl
def register_samplers(register):
    register(VAEDescriptor(name="not-a-sampler", summary="wrong kind"))
"""


@pytest.fixture
def plugin_dir(tmp_path):
    return tmp_path / "site"


def with_path(path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}


def test_plugins_json_contract_builtins(cli):
    res = cli("plugins", "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    builtin = next(p for p in data if p["name"] == "krea2kit")
    assert set(builtin) == {"name", "distribution", "version", "module", "builtin", "hooks", "registers", "commands"}
    assert builtin["builtin"] is True and builtin["distribution"] == "krea2kit"
    regs = builtin["registers"]
    assert {"euler", "heun", "euler_ancestral"} <= set(regs["sampler"])
    assert {"krea2-turbo", "krea2-raw", "krea2-nano-turbo"} <= set(regs["model"])
    assert regs["dit"] == ["krea2"] and set(regs["vae"]) == {"qwen-image", "flux2"}
    assert "register_samplers" in builtin["hooks"]
    assert "vae" in builtin["commands"]


def test_third_party_plugin_listed_with_distribution(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-good", "k2good", GOOD, version="1.2.3")
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0, res.stderr
    good = next(p for p in json.loads(res.stdout) if p["name"] == "krea2kit-good")
    assert good["distribution"] == "krea2kit-good" and good["version"] == "1.2.3"
    assert good["builtin"] is False and good["registers"] == {"sampler": ["good-sampler"]}
    text = cli("plugins", env=with_path(plugin_dir))
    assert "krea2kit-good (krea2kit-good 1.2.3)" in text.stdout and "sampler: good-sampler" in text.stdout


def test_broken_plugin_is_reported_and_skipped(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-broken", "k2broken", BROKEN)
    make_plugin(plugin_dir, "krea2kit-good", "k2good", GOOD)
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0
    names = [p["name"] for p in json.loads(res.stdout)]
    assert "krea2kit-broken" not in names and "krea2kit-good" in names
    assert "krea2kit-broken" in res.stderr and "failed to import" in res.stderr
    assert "not installed" in res.stderr and "Traceback" not in res.stderr


def test_strict_mode_turns_a_broken_plugin_into_an_error(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-broken", "k2broken", BROKEN)
    res = cli("plugins", env={**with_path(plugin_dir), "KREA2KIT_STRICT_PLUGINS": "1"})
    assert res.code == 1
    assert "krea2kit-broken" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_clash_is_reported_and_never_silently_resolved(cli, plugin_dir, tmp_path):
    make_plugin(plugin_dir, "krea2kit-clash", "k2clash", CLASH)
    env = with_path(plugin_dir)
    res = cli("plugins", "--json", env=env)
    assert res.code == 0
    assert "clash" in res.stderr and "'euler'" in res.stderr and "krea2kit-clash" in res.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text('prompt = "x"\n[sampler]\nname = "euler"\n')
    res = cli("run", str(recipe), "--dry-run", env=env)
    assert res.code == 2
    assert "several plugins" in res.stderr and "PLUGIN:euler" in res.stderr
    res = cli("run", str(recipe), "--dry-run", "--set", 'sampler.name="krea2kit:euler"', env=env)
    assert res.code == 0, res.stderr


def test_misspelled_hook_is_caught(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-typo", "k2typo", TYPO)
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0
    assert "krea2kit-typo" not in [p["name"] for p in json.loads(res.stdout)]
    assert "register_sampler" in res.stderr and "unknown hook" in res.stderr


@pytest.mark.parametrize("source,needle", [(RAISES, "boom while registering"), (WRONG_TYPE, "expects SamplerDescriptor")])
def test_plugin_failing_in_a_hook_is_skipped_whole(cli, plugin_dir, source, needle):
    make_plugin(plugin_dir, "krea2kit-bad", "k2bad", source)
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0
    assert "krea2kit-bad" not in [p["name"] for p in json.loads(res.stdout)]
    assert needle in res.stderr


def test_env_var_selects_plugins(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-good", "k2good", GOOD)
    make_plugin(plugin_dir, "krea2kit-broken", "k2broken", BROKEN)
    env = with_path(plugin_dir)
    only_good = cli("plugins", "--json", env={**env, "KREA2KIT_PLUGINS": "krea2kit-good"})
    assert only_good.code == 0 and "krea2kit-broken" not in only_good.stderr
    assert "krea2kit-good" in [p["name"] for p in json.loads(only_good.stdout)]
    none = cli("plugins", "--json", env={**env, "KREA2KIT_PLUGINS": ""})
    assert [p["name"] for p in json.loads(none.stdout)] == ["krea2kit"]
    missing = cli("plugins", env={**env, "KREA2KIT_PLUGINS": "krea2kit-nope"})
    assert "krea2kit-nope" in missing.stderr and "not installed" in missing.stderr


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["recipe", "schema"], ["run", "--help"]])
def test_listing_and_help_do_not_import_torch(isolated_env, args):
    code = (
        "import sys\n"
        "from krea2kit.cli import main\n"
        f"sys.argv = ['krea2kit', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=isolated_env, timeout=60)
    assert "NO-TORCH" in proc.stderr, proc.stderr


LORA_FORMAT = """
import torch
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import LoraFormatDescriptor


class TxtLora:
    '''A toy format: a safetensors file whose metadata says format=toy; one rank-1 delta on first.'''

    def detect(self, keys, metadata):
        return metadata.get("format") == "toy"

    def parse(self, path, *, strict=False, name=None):
        from krea2kit.adapters.formats import parse_lora_state_dict
        tensors = {"diffusion_model.first.lora_A.weight": torch.ones(1, 64),
                   "diffusion_model.first.lora_B.weight": torch.ones(128, 1)}
        lora = parse_lora_state_dict(tensors, {}, path=str(path), name=name or "toy")
        lora.layout = "toy"
        return lora


@hookimpl
def register_lora_formats(register):
    register(LoraFormatDescriptor(name="toy", summary="toy format", load=lambda: TxtLora()))
"""


def test_registered_lora_format_reads_its_files(cli, plugin_dir, tmp_path):
    from safetensors.torch import save_file
    import torch

    make_plugin(plugin_dir, "krea2kit-toylora", "k2toy", LORA_FORMAT)
    save_file({"anything": torch.zeros(1)}, str(tmp_path / "toy.safetensors"), metadata={"format": "toy"})
    env = with_path(plugin_dir)
    res = cli("lora", "inspect", str(tmp_path / "toy.safetensors"), "--json", env=env)
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["layout"] == "toy" and info["modules"] == 1
    without = cli("lora", "inspect", str(tmp_path / "toy.safetensors"))  # the built-in reader refuses it
    assert without.code == 4
