"""`krea2kit run IMAGE.png` treats the recipe in an image as untrusted input (recipe/trust.py):
an image decides what the picture is, never where files go, whether they are replaced, which
local files are opened, or looser safety. Images record file names and hashes, not local
paths, unless the user config asks. Through the real CLI on the nano model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krea2kit.recipe.trust import untrusted_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

NANO = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights"

RECIPE = """
seed = 3
width = 64
height = 64
prompt = "a red circle on a white background"
[sampler]
steps = 2
[output]
dir = "made"
name = "honest"
"""


def pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def craft(src: Path, dest: Path, edit=None, *, raw_record: str | None = None) -> Path:
    """A copy of ``src`` (same pixels) whose krea2kit record is edited, or replaced by text."""
    with Image.open(src) as im:
        im.load()
        record = json.loads(im.info["krea2kit"])
        if edit is not None:
            edit(record)
        info = PngInfo()
        info.add_itxt("parameters", im.info["parameters"])
        info.add_itxt("krea2kit", raw_record if raw_record is not None else json.dumps(record))
        im.convert("RGB").save(dest, pnginfo=info)
    return dest


def small_lora(path: Path, seed: int = 0) -> Path:
    """A kohya-layout LoRA on the nano transformer's first attention projection."""
    import torch
    from safetensors.torch import save_file

    from krea2kit.models.dit_loader import dit_config_from_checkpoint
    from krea2kit.models.weights import open_checkpoint

    features = dit_config_from_checkpoint(open_checkpoint(NANO / "turbo")).features
    g = torch.Generator().manual_seed(seed)
    save_file({"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.randn(4, features, generator=g),
               "lora_unet_blocks_0_attn_wq.lora_up.weight": torch.randn(features, 4, generator=g),
               "lora_unet_blocks_0_attn_wq.alpha": torch.tensor(4.0)}, str(path))
    return path


@pytest.fixture
def honest(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    res = cli_inproc("run", "r.toml", "-q")
    assert res.code == 0, res.stderr
    return tmp_path / res.stdout.strip()


@pytest.mark.parametrize("where", ["absolute", "dotdot", "home"])
def test_image_cannot_choose_where_files_go_replace_them_or_open_paths(cli_inproc, honest, tmp_path, monkeypatch,
                                                                      where):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("K2K_TEST_SECRET", "/etc/shadow")
    target = {"absolute": str(tmp_path / "elsewhere"), "dotdot": f"../escape-{tmp_path.name}",
              "home": "~/pictures"}[where]

    def evil(record):
        r = record["recipe"]
        r["output"].update(dir=target, name="victim", overwrite=True)
        r["model"]["weights"] = {"dit": "/etc/passwd", "vae": {"env": "K2K_TEST_SECRET"}}
        r["model"]["device"] = "cuda:7"
        r["extends"] = "/etc/krea2kit-evil.toml"
        r["plugins"] = {"krea2kit-example": {"caption": "x"}}
        r["safety"]["settings"] = {"krea2kit.opennsfw": {"threshold": 1.0}}

    image = craft(honest, tmp_path / "evil.png", evil)
    victim = tmp_path / "krea2kit-out" / "evil-0000-3.png"  # the local default name for this image
    victim.parent.mkdir()
    victim.write_bytes(b"the user's own file")

    res = cli_inproc("run", str(image))
    assert res.code == 0, res.stderr
    # one warning line naming every ignored key (not their values)
    warnings = [line for line in res.stderr.splitlines() if "ignored" in line]
    assert len(warnings) == 1, res.stderr
    for key in ("output.dir", "output.name", "output.overwrite", "model.weights.dit", "model.weights.vae",
                "model.device", "extends", "plugins.krea2kit-example", "safety.settings.krea2kit.opennsfw"):
        assert key in warnings[0], (key, warnings[0])
    assert "/etc/passwd" not in res.stderr and "shadow" not in res.stderr
    # written only into the user's output folder, next to (never over) the existing file
    assert res.stdout.splitlines() == ["krea2kit-out/evil-0000-3-2.png"]
    assert victim.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["evil-0000-3-2.png", "evil-0000-3.png"]
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path.parent / f"escape-{tmp_path.name}").exists()
    assert list(home.iterdir()) == []
    # the weights used are the preset's (a /etc/passwd dit would be exit 4): the same picture
    assert pixels(tmp_path / res.stdout.strip()) == pixels(honest)


def test_image_with_a_lora_needs_the_file_from_the_local_user(cli_inproc, tmp_path):
    lora = small_lora(tmp_path / "style.safetensors")
    (tmp_path / "r.toml").write_text(RECIPE + f'[[loras]]\npath = "{lora}"\nstrength = 0.8\n')
    made = cli_inproc("run", "r.toml", "-q")
    assert made.code == 0, made.stderr
    honest = tmp_path / made.stdout.strip()

    # the image names the LoRA by file name and hash; a crafted path is never opened
    image = craft(honest, tmp_path / "img.png", lambda rec: rec["recipe"]["loras"][0].update(path="/etc/passwd"))
    res = cli_inproc("run", str(image))
    assert res.code == 2, res.stderr
    assert "loras.0.path" in res.stderr and "--set loras.0.path=" in res.stderr
    assert "style.safetensors" in res.stderr and "Traceback" not in res.stderr and res.stdout == ""
    shown = cli_inproc("recipe", "show", str(image), "--json")  # reading the recipe needs no file
    assert shown.code == 0, shown.stderr
    assert json.loads(shown.stdout)["loras"][0]["strength"] == 0.8 and "unresolved" in shown.stderr
    assert "path" not in json.loads(shown.stdout)["loras"][0]  # the crafted path was dropped, not shown

    again = cli_inproc("run", str(image), "-q", "--set", f"loras.0.path={lora}")
    assert again.code == 0, again.stderr
    assert "not the one the image was made with" not in again.stderr
    assert pixels(tmp_path / again.stdout.strip()) == pixels(honest)
    other = small_lora(tmp_path / "other.safetensors", seed=1)
    swapped = cli_inproc("run", str(image), "--dry-run", "--set", f"loras.0.path={other}")
    assert swapped.code == 0, swapped.stderr
    assert "loras.0.path: the file given is not the one the image was made with" in swapped.stderr

    with Image.open(honest) as im:
        record = json.loads(im.info["krea2kit"])
    assert record["recipe"]["loras"][0]["path"] == "style.safetensors"
    import hashlib

    assert record["loras"] == [{"name": "style", "file": "style.safetensors",
                                "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]


def _chunks(path: Path) -> str:
    with Image.open(path) as im:
        im.load()
        return json.dumps({k: v for k, v in im.info.items() if isinstance(v, str)})


@pytest.mark.parametrize("local_paths", [False, True])
def test_metadata_records_file_names_unless_the_user_config_asks(cli_inproc, tmp_path, local_paths):
    config = tmp_path / f"config-{local_paths}.toml"
    config.write_text(f"[metadata]\nlocal_paths = {str(local_paths).lower()}\n")
    (tmp_path / "r.toml").write_text(RECIPE)
    dit = NANO / "turbo"
    res = cli_inproc("run", "r.toml", "-q", "--set", f'model.weights.dit="{dit}"',
                     env={"KREA2KIT_CONFIG": str(config)})
    assert res.code == 0, res.stderr
    image = tmp_path / res.stdout.strip()
    text = _chunks(image)
    with Image.open(image) as im:
        record = json.loads(im.info["krea2kit"])
    if local_paths:
        assert record["recipe"]["model"]["weights"]["dit"] == str(dit)
        assert record["weights"]["dit"]["weights"] == str(dit)
    else:
        assert record["recipe"]["model"]["weights"]["dit"] == "turbo"
        assert record["weights"]["dit"]["weights"] == "turbo"
        assert record["weights"]["vae"]["weights"] == "vae"
        assert str(NANO) not in text and str(tmp_path) not in text  # no local folder anywhere


@pytest.mark.parametrize(("raw", "says"), [
    ("[1, 2]", "krea2kit record is a JSON array, not an object"),
    ('"a string"', "krea2kit record is a JSON string, not an object"),
    ('{"recipe": [1]}', "recipe is a JSON array, not an object"),
    ('{"recipe": "seed = 1"}', "recipe is a JSON string, not an object"),
])
def test_image_record_that_is_not_an_object_is_a_clear_error(cli_inproc, honest, tmp_path, raw, says):
    image = craft(honest, tmp_path / "odd.png", raw_record=raw)
    res = cli_inproc("run", str(image))
    assert res.code == 2, res.stderr
    assert says in res.stderr and "odd.png" in res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr


def test_trust_rule_keeps_what_makes_the_picture_and_drops_the_rest():
    data = {
        "schema": "krea2kit.recipe/1", "prompt": "p", "negative": "n", "seed": 9, "count": 2, "width": 64,
        "height": 48, "prompts": [{"text": "q", "seed": 1, "evil": 1}],
        "model": {"preset": "krea2-nano-raw", "dtype": "float32", "layout": "compact", "device": "auto",
                  "weights": {"dit": None, "text_encoder": None, "vae": None}},
        "sampler": {"name": "euler", "steps": 4, "guidance": 1.0},
        "loras": [{"path": "/x/y.safetensors", "name": "y", "strength": 0.5}],
        "sliders": [{"name": "s", "value": 0.5, "lora": "y"}],
        "safety": {"filters": ["krea2kit.opennsfw"], "settings": {}},
        "output": {"dir": "krea2kit-out", "name": "{recipe}-{index:04d}-{seed}", "format": "jpeg", "quality": 90,
                   "overwrite": False, "metadata": True, "include_prompt": True},
        "plugins": {},
    }
    kept, dropped = untrusted_recipe(data)
    # defaults and empty values are dropped silently: they decide nothing
    assert dropped == ["prompts.0.evil", "loras.0.path"]
    assert kept["model"] == {"preset": "krea2-nano-raw", "dtype": "float32", "layout": "compact"}
    assert kept["loras"] == [{"name": "y", "strength": 0.5}]
    assert kept["output"] == {"format": "jpeg", "quality": 90}
    assert kept["sampler"] == data["sampler"] and kept["sliders"] == data["sliders"]
    assert kept["safety"] == {"filters": ["krea2kit.opennsfw"]}
    assert "plugins" not in kept
