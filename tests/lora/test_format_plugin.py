"""A new LoRA layout is one file: a plugin module declares a ``KeyLayout`` and registers it
through ``register_lora_formats``; the real CLI then inspects and applies its files, with
the same numbers as the same LoRA in a built-in layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import krea2kit
from krea2kit.models.dit_loader import dit_config_from_checkpoint
from krea2kit.models.weights import open_checkpoint
from plugin_factory import make_plugin

# The whole plugin: slash-separated native names under "unet/", the shared suffixes and alpha.
SLASHES = '''
"""krea2kit LoRA layout: unet/blocks/3/attn/wq.lora_down.weight (+ .lora_up.weight, .alpha)."""
from krea2kit.lora.formats import KeyLayout, LayoutFormat
from krea2kit.hookspecs import hookimpl
from krea2kit.models.key_names import is_native_linear
from krea2kit.registry import LoraFormatDescriptor


def to_native(path):
    name = path.replace("/", ".")
    return name if is_native_linear(name) else None


LAYOUT = KeyLayout(name="slashes", prefixes=("unet/",), to_native=to_native)


def load(options, context):
    return LayoutFormat(LAYOUT)


@hookimpl
def register_lora_formats(register):
    register(LoraFormatDescriptor(name="slashes", summary="unet/ + slash-separated native names", load=load))
'''

RECIPE = """
seed = 5
width = 64
height = 64
prompt = "a red circle"
[sampler]
steps = 2
[output]
dir = "out"
"""


def _nano_modules() -> dict[str, tuple[int, int]]:
    cfg = dit_config_from_checkpoint(open_checkpoint(Path(krea2kit.__file__).parent / "nano" / "weights" / "turbo"))
    return {f"blocks.{i}.attn.{m}": (cfg.features, cfg.features) for i in range(cfg.layers) for m in ("wq", "wo")}


def _write(path: Path, spell, rank: int = 2, alpha: float = 1.0) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (out_f, in_f) in _nano_modules().items():
        key = spell(name)
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


@pytest.mark.slow
def test_a_layout_in_one_plugin_file_reads_and_applies_through_the_cli(cli, tmp_path):
    site = make_plugin(tmp_path / "site", "krea2kit-slashes", "k2slashes", SLASHES)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    toy = _write(tmp_path / "toy.safetensors", lambda n: "unet/" + n.replace(".", "/"))
    kohya = _write(tmp_path / "kohya.safetensors", lambda n: "lora_unet_" + n.replace(".", "_"))
    (tmp_path / "r.toml").write_text(RECIPE)

    listed = cli("plugins", "--json", env=env)
    assert listed.code == 0, listed.stderr
    plugin = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "krea2kit-slashes")
    assert plugin["registers"] == {"lora_format": ["slashes"]}

    inspected = cli("lora", "inspect", str(toy), "--json", env=env)
    assert inspected.code == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["layout"] == "slashes" and info["key_prefix"] == "unet/"
    assert info["modules"] == len(_nano_modules()) and info["scales"] == {"0.5": len(_nano_modules())}
    assert info["unmatched"] == 0
    without = cli("lora", "inspect", str(toy))  # no plugin: no format knows these names
    assert without.code == 4 and "no Krea 2 LoRA tensors" in without.stderr and "Traceback" not in without.stderr

    def run(lora: Path | None, name: str) -> Path:
        args = ["--set", f'output.name="{name}"'] + (["--set", f'loras=[{{path="{lora}"}}]'] if lora else [])
        res = cli("run", "r.toml", "-q", *args, env=env)
        assert res.code == 0, res.stderr
        return tmp_path / res.stdout.splitlines()[0]

    via_plugin, via_kohya, plain = run(toy, "toy"), run(kohya, "kohya"), run(None, "plain")
    assert _pixels(via_plugin) == _pixels(via_kohya)  # same ΔW whichever layout names it
    assert _pixels(via_plugin) != _pixels(plain)
