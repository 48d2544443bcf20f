"""[[loras]] files at plan time, through the real CLI (issue 12):

* a LoRA file that is missing, not a safetensors file, a folder without one, a FIFO or a
  device is found when the run is planned, before any weights load: exit 4 naming the file
  and ``loras[N].path`` (it used to surface after the models had loaded);
* a LoRA path given as ``{env = "VAR"}`` is shown and recorded as that reference: the
  variable's value appears in no message, in no ``recipe show`` output and in no image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from krea2kit.errors import EXIT_USAGE, EXIT_WEIGHTS

NANO = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights"
SECRET = "sk-live-4b1d9e77c0a2"  # stands for a private folder name; must never be shown

RECIPE = """
seed = 3
width = 64
height = 64
prompt = "a red circle"
[sampler]
steps = 2
[output]
dir = "out"
"""


def small_lora(path: Path) -> Path:
    """A kohya-layout LoRA on the nano transformer's first attention projection."""
    import torch
    from safetensors.torch import save_file

    from krea2kit.models.dit_loader import dit_config_from_checkpoint
    from krea2kit.models.weights import open_checkpoint

    features = dit_config_from_checkpoint(open_checkpoint(NANO / "turbo")).features
    g = torch.Generator().manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.randn(4, features, generator=g),
               "lora_unet_blocks_0_attn_wq.lora_up.weight": torch.randn(features, 4, generator=g),
               "lora_unet_blocks_0_attn_wq.alpha": torch.tensor(4.0)}, str(path))
    return path


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the message must hold)."""
    (tmp_path / "text.safetensors").write_text("this is not a safetensors file\n")
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "truncated.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
    truncated.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    cases = {
        "missing": (tmp_path / "nowhere.safetensors", "LoRA file not found"),
        "not safetensors": (tmp_path / "text.safetensors", "not a safetensors file"),
        "truncated": (truncated, "truncated file"),
        "folder without one": (tmp_path / "empty", "no .safetensors file in the folder"),
        "pickle": (tmp_path / "old.ckpt", "pickled checkpoints are never loaded"),
    }
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04K\x01.")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.safetensors")
        cases["fifo"] = (tmp_path / "pipe.safetensors", "not a regular file")
    if Path("/dev/zero").exists():
        cases["device"] = (Path("/dev/zero"), "not a regular file")
    return cases


def test_a_bad_lora_file_is_exit_4_at_plan_time(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    for name, (path, words) in bad_files(tmp_path).items():
        entry = f'loras=[{{path="{path}"}}]'
        for args in (("run", "r.toml", "--dry-run"), ("recipe", "check", "r.toml")):
            res = cli_inproc(*args, "--set", entry)
            assert res.code == EXIT_WEIGHTS, (name, res.stderr)
            assert f"{path}: loras[0].path: {words}" in res.stderr, (name, res.stderr)
            assert "Traceback" not in res.stderr and res.stdout == ""


def test_a_missing_lora_stops_the_run_before_any_weights_load(cli, tmp_path):
    """Through a subprocess, a real run (no --dry-run): nothing is loaded, nothing written."""
    (tmp_path / "r.toml").write_text(RECIPE + '[[loras]]\npath = "style.safetensors"\n'
                                              '[[loras]]\npath = "loras/missing.safetensors"\n')
    small_lora(tmp_path / "style.safetensors")
    res = cli("run", "r.toml")
    assert res.code == EXIT_WEIGHTS, res.stderr
    assert "loras/missing.safetensors: loras[1].path: LoRA file not found" in res.stderr
    assert "loading" not in res.stderr and res.stdout == "" and not (tmp_path / "out").exists()


def test_a_recipe_error_is_reported_before_a_missing_lora(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE + '[[loras]]\npath = "nowhere.safetensors"\n')
    res = cli_inproc("run", "r.toml", "--dry-run", "--set", 'output.format="tiff"')
    assert res.code == EXIT_USAGE and "output.format" in res.stderr


def test_an_env_lora_path_is_shown_and_recorded_as_the_reference(cli_inproc, tmp_path):
    lora = small_lora(tmp_path / SECRET / "style.safetensors")
    (tmp_path / "r.toml").write_text(RECIPE + '[[loras]]\npath = {env = "K2K_TEST_LORA"}\nname = "style"\n')
    env = {"K2K_TEST_LORA": str(lora)}

    shown = cli_inproc("recipe", "show", "r.toml", env=env)
    assert shown.code == 0, shown.stderr
    assert 'env = "K2K_TEST_LORA"' in shown.stdout and SECRET not in shown.stdout + shown.stderr
    as_json = cli_inproc("recipe", "show", "r.toml", "--json", env=env)
    assert json.loads(as_json.stdout)["loras"][0]["path"]["env"] == "K2K_TEST_LORA"
    assert SECRET not in as_json.stdout

    # the value is not shown in errors either: the variable's name is
    missing = cli_inproc("run", "r.toml", "--dry-run", env={"K2K_TEST_LORA": str(tmp_path / SECRET / "gone.safetensors")})
    assert missing.code == EXIT_WEIGHTS, missing.stderr
    assert "$K2K_TEST_LORA: loras[0].path: LoRA file not found" in missing.stderr
    assert "hint: set $K2K_TEST_LORA to a LoRA .safetensors file" in missing.stderr
    assert SECRET not in missing.stderr

    # the image records the reference (and the file's name and hash), not the value
    run = cli_inproc("run", "r.toml", "-q", "--json", env=env)
    assert run.code == 0, run.stderr
    image = tmp_path / json.loads(run.stdout)["path"]
    assert SECRET not in run.stdout + run.stderr
    assert SECRET.encode() not in image.read_bytes()
    from krea2kit.output.metadata import read_image_metadata

    record = read_image_metadata(image)["krea2kit"]
    assert record["recipe"]["loras"][0]["path"]["env"] == "K2K_TEST_LORA"
    assert record["loras"][0]["file"] == "style.safetensors" and len(record["loras"][0]["sha256"]) == 64


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_lora_is_exit_4(cli_inproc, tmp_path):
    lora = small_lora(tmp_path / "style.safetensors")
    lora.chmod(0)
    (tmp_path / "r.toml").write_text(RECIPE + f'[[loras]]\npath = "{lora}"\n')
    res = cli_inproc("recipe", "check", "r.toml")
    assert res.code == EXIT_WEIGHTS and "loras[0].path: cannot read weights" in res.stderr
