"""LoRAs and sliders end to end through the real CLI on the nano model: strength, layouts
giving identical images, step ranges, slider value 0 == no LoRA, sweeps with a contact
sheet, `lora inspect` / `lora convert`, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import krea2kit
from krea2kit.models.dit_loader import dit_config_from_checkpoint
from krea2kit.models.weights import open_checkpoint

RECIPE = """
seed = 5
width = 64
height = 64
prompt = "a red circle"
[sampler]
steps = 3
[output]
dir = "out"
"""

# Shapes of the shipped nano transformer (attention in/out projections, `last.linear`), read
# from the file the nano preset loads.
_NANO = dit_config_from_checkpoint(open_checkpoint(Path(krea2kit.__file__).parent / "nano" / "weights" / "turbo"))
MODULES = {f"blocks.{i}.attn.{m}": (_NANO.features, _NANO.features) for i in range(_NANO.layers) for m in ("wq", "wo")}
MODULES["last.linear"] = (_NANO.patch**2 * _NANO.channels, _NANO.features)


def kohya_lora(path, rank=4, alpha=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in MODULES.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "krea2_raw"})
    return path


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    return tmp_path, kohya_lora(tmp_path / "style.safetensors")


def pixels(path):
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def run(cli, *args):
    res = cli("run", "r.toml", "-q", *args)
    assert res.code == 0, res.stderr
    return [line for line in res.stdout.splitlines()]


def test_strength_layouts_and_step_ranges(cli, setup):
    tmp, lora = setup
    plain = run(cli, "--set", 'output.name="plain"')[0]
    entry = f'loras=[{{path="{lora}", strength=1.0}}]'
    styled = run(cli, "--set", entry, "--set", 'output.name="styled"')[0]
    zero = run(cli, "--set", f'loras=[{{path="{lora}", strength=0.0}}]', "--set", 'output.name="zero"')[0]
    assert pixels(tmp / plain) == pixels(tmp / zero)
    assert pixels(tmp / plain) != pixels(tmp / styled)
    converted = cli("lora", "convert", str(lora), "--to", "diffusers", str(tmp / "style-diffusers.safetensors"))
    assert converted.code == 0, converted.stderr
    via_diffusers = run(cli, "--set", f'loras=[{{path="{tmp / "style-diffusers.safetensors"}"}}]',
                        "--set", 'output.name="diffusers"')[0]
    assert pixels(tmp / via_diffusers) == pixels(tmp / styled)
    never = run(cli, "--set", f'loras=[{{path="{lora}", steps=[5, 9]}}]', "--set", 'output.name="never"')[0]
    assert pixels(tmp / never) == pixels(tmp / plain)  # a range outside the 3 steps does nothing
    late = run(cli, "--set", f'loras=[{{path="{lora}", steps=[2, 3]}}]', "--set", 'output.name="late"')[0]
    assert pixels(tmp / late) not in (pixels(tmp / plain), pixels(tmp / styled))


def test_slider_zero_is_no_lora_and_sweep_writes_a_contact_sheet(cli, setup):
    tmp, lora = setup
    slider = ['--set', f'loras=[{{path="{lora}", name="style"}}]',
              '--set', 'sliders=[{name="amount", value=0.0, lora="style", range=[-2.0, 2.0]}]']
    plain = run(cli, "--set", 'output.name="plain"')[0]
    at_zero = run(cli, *slider, "--set", 'output.name="zero"')[0]
    at_one = run(cli, *slider, "--set", "sliders.0.value=1.0", "--set", 'output.name="one"')[0]
    full = run(cli, "--set", f'loras=[{{path="{lora}"}}]', "--set", 'output.name="full"')[0]
    assert pixels(tmp / at_zero) == pixels(tmp / plain)
    assert pixels(tmp / at_one) == pixels(tmp / full)
    out_of_range = cli("run", "r.toml", *slider, "--set", "sliders.0.value=3.0")
    assert out_of_range.code == 2 and "outside its range" in out_of_range.stderr
    sweep = cli("run", "r.toml", *slider, "--sweep", "amount=-1:1:3", "--json")
    assert sweep.code == 0, sweep.stderr
    lines = [json.loads(line) for line in sweep.stdout.splitlines()]
    sheet = lines[-1]["contact_sheet"]
    assert len(lines) == 4 and lines[-1]["values"] == [-1.0, 0.0, 1.0]
    with Image.open(tmp / sheet) as im:
        assert im.size == (3 * 64, 14 + 64)
    assert pixels(tmp / lines[1]["path"]) == pixels(tmp / plain)  # the middle column is value 0
    bad = cli("run", "r.toml", *slider, "--sweep", "amout=-1:1:3")
    assert bad.code == 2 and "did you mean 'amount'" in bad.stderr


def test_dry_run_sweep_lists_every_column_and_writes_nothing(cli, setup):
    tmp, lora = setup
    slider = ['--set', f'loras=[{{path="{lora}", name="style"}}]',
              '--set', 'sliders=[{name="amount", value=0.0, lora="style", range=[-2.0, 2.0]}]']
    res = cli("run", "r.toml", *slider, "--sweep", "amount=-1:1:3", "--dry-run", "--json")
    assert res.code == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [line["value"] for line in lines] == [-1.0, 0.0, 1.0]
    assert all(line["status"] == "planned" and line["slider"] == "amount" for line in lines)
    assert not (tmp / "out").exists()  # nothing rendered, no contact sheet
    assert "nothing loaded" in res.stderr
    outside = cli("run", "r.toml", *slider, "--sweep", "amount=-3:1:3", "--dry-run")
    assert outside.code == 2 and "outside its range" in outside.stderr  # every column is validated


def test_lora_inspect_and_refusals(cli, setup):
    tmp, lora = setup
    res = cli("lora", "inspect", str(lora), "--json")
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["layout"] == "kohya" and info["modules"] == len(MODULES) and info["ranks"] == {"4": len(MODULES)}
    assert "krea2_raw" in info["base_model"]
    sdxl = tmp / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(sdxl))
    refused = cli("lora", "inspect", str(sdxl))
    assert refused.code == 4 and "SDXL" in refused.stderr
    run_refused = cli("run", "r.toml", "--set", f'loras=[{{path="{sdxl}"}}]')
    assert run_refused.code == 4 and "SDXL" in run_refused.stderr and "Traceback" not in run_refused.stderr
