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

def _load(options, context):
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
    register(SamplerDescriptor(name="euler", summary="another euler", load=lambda options, context: None))
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

WRONG_TABLE = """
from pydantic import BaseModel
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import OptionsDescriptor

class Opts(BaseModel):
    prefix: str = ""

@hookimpl
def register_options(register):
    register(OptionsDescriptor(name="sidecar", summary="a table its parts would never receive", options=Opts))
"""


@pytest.fixture
def plugin_dir(tmp_path):
    return tmp_path / "site"


def with_path(path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}


def listed(stdout: str) -> list[dict]:
    """The plugins of a `plugins --json` listing ({"contract": ..., "plugins": [...]})."""
    return json.loads(stdout)["plugins"]


def test_plugins_json_contract_builtins(cli):
    res = cli("plugins", "--json")
    assert res.code == 0, res.stderr
    top = json.loads(res.stdout)
    from krea2kit.contracts import CONTRACT_VERSION

    assert top["contract"]["version"] == CONTRACT_VERSION and top["contract"]["attribute"] == "KREA2KIT_CONTRACT"
    data = top["plugins"]
    builtin = next(p for p in data if p["name"] == "krea2kit")
    assert set(builtin) == {"name", "distribution", "version", "module", "builtin", "hooks", "registers", "commands",
                            "contract"}
    assert builtin["contract"] == CONTRACT_VERSION
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
    good = next(p for p in listed(res.stdout) if p["name"] == "krea2kit-good")
    assert good["distribution"] == "krea2kit-good" and good["version"] == "1.2.3"
    assert good["builtin"] is False and good["registers"] == {"sampler": ["good-sampler"]}
    text = cli("plugins", env=with_path(plugin_dir))
    assert good["contract"] is None  # it states none
    assert "krea2kit-good (krea2kit-good 1.2.3)" in text.stdout and "sampler: good-sampler" in text.stdout


def test_broken_plugin_is_reported_and_skipped(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-broken", "k2broken", BROKEN)
    make_plugin(plugin_dir, "krea2kit-good", "k2good", GOOD)
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0
    names = [p["name"] for p in listed(res.stdout)]
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
    assert "krea2kit-typo" not in [p["name"] for p in listed(res.stdout)]
    assert "register_sampler" in res.stderr and "unknown hook" in res.stderr


@pytest.mark.parametrize("source,needle", [(RAISES, "boom while registering"), (WRONG_TYPE, "expects SamplerDescriptor"),
                                           (WRONG_TABLE, "must be named after the plugin")])
def test_plugin_failing_in_a_hook_is_skipped_whole(cli, plugin_dir, source, needle):
    make_plugin(plugin_dir, "krea2kit-bad", "k2bad", source)
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0
    assert "krea2kit-bad" not in [p["name"] for p in listed(res.stdout)]
    assert needle in res.stderr


def test_env_var_selects_plugins(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-good", "k2good", GOOD)
    make_plugin(plugin_dir, "krea2kit-broken", "k2broken", BROKEN)
    env = with_path(plugin_dir)
    only_good = cli("plugins", "--json", env={**env, "KREA2KIT_PLUGINS": "krea2kit-good"})
    assert only_good.code == 0 and "krea2kit-broken" not in only_good.stderr
    assert "krea2kit-good" in [p["name"] for p in listed(only_good.stdout)]
    none = cli("plugins", "--json", env={**env, "KREA2KIT_PLUGINS": ""})
    assert [p["name"] for p in listed(none.stdout)] == ["krea2kit"]
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
        from krea2kit.lora.formats import parse_lora_state_dict
        tensors = {"diffusion_model.first.lora_A.weight": torch.ones(1, 64),
                   "diffusion_model.first.lora_B.weight": torch.ones(128, 1)}
        lora = parse_lora_state_dict(tensors, {}, path=str(path), name=name or "toy")
        lora.layout = "toy"
        return lora


@hookimpl
def register_lora_formats(register):
    register(LoraFormatDescriptor(name="toy", summary="toy format", load=lambda options, context: TxtLora()))
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


NEEDS_NEWER = GOOD.replace("good-sampler", "future-sampler") + "\nKREA2KIT_CONTRACT = 99\n"
STATES_OLD = GOOD.replace("good-sampler", "old-sampler") + "\nKREA2KIT_CONTRACT = 1\n"
STATES_CURRENT = GOOD.replace("good-sampler", "current-sampler") + "\nKREA2KIT_CONTRACT = '>=2'\n"
STATES_JUNK = GOOD.replace("good-sampler", "junk-sampler") + "\nKREA2KIT_CONTRACT = 'latest'\n"


def test_plugin_contract_version_is_checked_at_load(cli, plugin_dir):
    make_plugin(plugin_dir, "krea2kit-future", "k2future", NEEDS_NEWER, version="9.0")
    make_plugin(plugin_dir, "krea2kit-old", "k2old", STATES_OLD)
    make_plugin(plugin_dir, "krea2kit-current", "k2current", STATES_CURRENT)
    make_plugin(plugin_dir, "krea2kit-junk", "k2junk", STATES_JUNK)
    res = cli("plugins", "--json", env=with_path(plugin_dir))
    assert res.code == 0, res.stderr
    plugins = {p["name"]: p for p in listed(res.stdout)}
    assert set(plugins) == {"krea2kit", "krea2kit-current"}
    assert plugins["krea2kit-current"]["contract"] == 2
    assert "krea2kit-future" in res.stderr and "needs plugin contract 99" in res.stderr and "upgrade krea2kit" in res.stderr
    assert "krea2kit-old" in res.stderr and "written for plugin contract 1" in res.stderr
    assert "krea2kit-junk" in res.stderr and "not a version number" in res.stderr
    assert "Traceback" not in res.stderr
    strict = cli("plugins", env={**with_path(plugin_dir), "KREA2KIT_STRICT_PLUGINS": "1"})
    assert strict.code == 1 and "contract" in strict.stderr


OLD_STYLE_SAMPLER = """
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import SamplerDescriptor

def _load():   # the contract-1 style: no (options, context)
    from krea2kit.sampling import euler
    return euler

@hookimpl
def register_samplers(register):
    register(SamplerDescriptor(name="old-style", summary="written before contract 2", load=_load))
"""


def test_a_load_with_the_wrong_signature_is_named_not_a_traceback(cli, plugin_dir, tmp_path):
    make_plugin(plugin_dir, "krea2kit-oldstyle", "k2oldstyle", OLD_STYLE_SAMPLER)
    (tmp_path / "r.toml").write_text('prompt = "x"\nwidth = 32\nheight = 32\n[sampler]\nname = "old-style"\nsteps = 1\n')
    res = cli("run", "r.toml", env=with_path(plugin_dir))
    assert res.code == 1, res.stderr
    assert "'old-style'" in res.stderr and "krea2kit-oldstyle" in res.stderr
    assert "load(options, context)" in res.stderr and "Traceback" not in res.stderr
