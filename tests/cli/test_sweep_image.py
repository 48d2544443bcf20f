"""`krea2kit run IMAGE.png --sweep ...` loads the image's recipe the way `run` does (issue 12):
the keys it ignores are named on stderr, once, before anything else; and the recipe is read
once for all columns (a stdin recipe can be swept too). Through the real CLI on the nano model."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krea2kit.errors import EXIT_USAGE

NANO = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights"


def small_lora(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from krea2kit.models.dit_loader import dit_config_from_checkpoint
    from krea2kit.models.weights import open_checkpoint

    features = dit_config_from_checkpoint(open_checkpoint(NANO / "turbo")).features
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.randn(4, features, generator=g),
               "lora_unet_blocks_0_attn_wq.lora_up.weight": torch.randn(features, 4, generator=g),
               "lora_unet_blocks_0_attn_wq.alpha": torch.tensor(4.0)}, str(path))
    return path


def shared_image(path: Path, their_folder: Path) -> Path:
    """An image as a stranger might send it: a recipe with a slider bound to a LoRA, plus
    keys an image may not decide (where files go, a LoRA path)."""
    recipe = {
        "prompt": "a red circle", "seed": 4, "width": 64, "height": 64, "sampler": {"steps": 2},
        "loras": [{"name": "style", "path": "/opt/theirs/style.safetensors"}],
        "sliders": [{"name": "amount", "lora": "style", "value": 0.5, "range": [-2.0, 2.0]}],
        "output": {"dir": str(their_folder), "overwrite": True},
    }
    info = PngInfo()
    info.add_itxt("krea2kit", json.dumps({"recipe": recipe}))
    Image.new("RGB", (64, 64), (200, 40, 40)).save(path, pnginfo=info)
    return path


def test_a_sweep_of_an_image_names_the_ignored_keys(cli_inproc, tmp_path):
    image = shared_image(tmp_path / "shared.png", tmp_path / "theirs")
    lora = small_lora(tmp_path / "style.safetensors")
    given = ["--set", f"loras.0.path={lora}", "--set", 'output.dir="sweeps"']

    dry = cli_inproc("run", str(image), *given, "--sweep", "amount=-1:1:2", "--dry-run", "--json")
    assert dry.code == 0, dry.stderr
    warnings = [line for line in dry.stderr.splitlines() if "ignored" in line]
    assert len(warnings) == 1, dry.stderr  # once, not once per column
    assert "output.dir" in warnings[0] and "output.overwrite" in warnings[0] and "loras.0.path" in warnings[0]
    assert str(tmp_path / "theirs") not in dry.stderr
    assert [json.loads(line)["value"] for line in dry.stdout.splitlines()] == [-1.0, 1.0]

    real = cli_inproc("run", str(image), *given, "--sweep", "amount=-1:1:2", "--json", "-q")
    assert real.code == 0, real.stderr
    assert len([line for line in real.stderr.splitlines() if "ignored" in line]) == 1
    lines = [json.loads(line) for line in real.stdout.splitlines()]
    assert [Path(line["path"]).parent.name for line in lines[:2]] == ["sweeps", "sweeps"]
    assert Path(lines[-1]["contact_sheet"]).parent.name == "sweeps"
    assert not (tmp_path / "theirs").exists()

    # the image's LoRA still needs a local file, named as a run names it
    no_file = cli_inproc("run", str(image), "--sweep", "amount=-1:1:2", "--dry-run")
    assert no_file.code == EXIT_USAGE and "--set loras.0.path=" in no_file.stderr


def test_a_stdin_recipe_can_be_swept(cli_inproc, tmp_path):
    """Each column used to load the recipe again: from stdin, the second read found nothing."""
    lora = small_lora(tmp_path / "style.safetensors")
    recipe = (f'prompt = "a red circle"\nwidth = 64\nheight = 64\n[[loras]]\npath = "{lora}"\nname = "style"\n'
              '[[sliders]]\nname = "amount"\nlora = "style"\nrange = [-2.0, 2.0]\n')
    res = cli_inproc("run", "-", "--sweep", "amount=-1:1:3", "--dry-run", "--json", input=recipe)
    assert res.code == 0, res.stderr
    assert [json.loads(line)["value"] for line in res.stdout.splitlines()] == [-1.0, 0.0, 1.0]
