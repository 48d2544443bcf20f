"""`krea2kit run` end to end through the real CLI on the embedded nano model: the stdout /
stderr contract, --json, exit codes, determinism, re-running an image's recipe, padding,
bad weights, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

NANO = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights"

RECIPE = """
seed = 3
width = 64
height = 64
[[prompts]]
text = "a red circle on a white background"
count = 2
[[prompts]]
text = "a blue square"
[sampler]
steps = 2
[output]
dir = "out"
name = "img-{index:02d}-{seed}"
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_run_prints_paths_on_stdout_and_people_on_stderr(cli, recipe, tmp_path):
    res = cli("run", str(recipe))
    assert res.code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines == ["out/img-00-3.png", "out/img-01-4.png", "out/img-02-3.png"]
    for line in lines:
        with Image.open(tmp_path / line) as im:
            assert im.size == (64, 64) and im.format == "PNG"
    assert "wrote out/img-00-3.png" in res.stderr and "3 image(s)" in res.stderr
    assert "\x1b[" not in res.stderr  # not a terminal: no control codes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img-00-3.png", "img-01-4.png", "img-02-3.png"]


def test_prompt_names_fill_the_name_field(cli, recipe, tmp_path):
    """``{name}`` is a [[prompts]] entry's name, else its prompt slug."""
    text = RECIPE.replace('count = 2', 'count = 2\nname = "circle"').replace(
        'name = "img-{index:02d}-{seed}"', 'name = "{name}-{seed}"')
    recipe.write_text(text)
    res = cli("run", str(recipe), "-q", "--set", "sampler.steps=1")
    assert res.code == 0, res.stderr
    assert res.stdout.splitlines() == ["out/circle-3.png", "out/circle-4.png", "out/a-blue-square-3.png"]


def test_json_lines_shape(cli, recipe):
    res = cli("run", str(recipe), "--json", "-q")
    assert res.code == 0, res.stderr
    assert res.stderr == ""  # -q: nothing for people on success
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    expected = {"index", "status", "path", "prompt", "negative", "seed", "width", "height", "model", "sampler",
                "steps", "guidance", "guidance_convention", "mu", "run_id", "sha256", "blocked_by", "verdicts",
                "timings", "variation_seed", "variation_strength"}
    for r in records:
        assert set(r) == expected
        assert r["variation_seed"] is None and r["variation_strength"] is None  # no [variation]
        assert r["status"] == "ok" and r["model"] == "krea2-nano-turbo" and r["steps"] == 2
        assert r["mu"] == pytest.approx(1.15) and r["guidance_convention"] == "krea"
        assert {"encode", "denoise", "decode", "filter", "write"} <= set(r["timings"])
        assert any(v["filter"] == "krea2kit.opennsfw" for v in r["verdicts"])
    assert len({r["run_id"] for r in records}) == 1


def test_same_seed_same_pixels_and_image_rerun_reproduces(cli, recipe, tmp_path):
    first = cli("run", str(recipe), "-q")
    second = cli("run", str(recipe), "-q", "--set", "output.overwrite=false")
    assert first.code == second.code == 0
    a, b = first.stdout.split(), second.stdout.split()
    assert b[0] == "out/img-00-3-2.png"  # never overwritten by default
    assert pixels(tmp_path / a[0]) == pixels(tmp_path / b[0])
    assert pixels(tmp_path / a[0]) != pixels(tmp_path / a[1])  # seed + 1 differs
    assert pixels(tmp_path / a[0]) != pixels(tmp_path / a[2])  # another prompt differs
    again = cli("run", a[1], "-q", "--set", 'output.name="again"')
    assert again.code == 0, again.stderr
    assert pixels(tmp_path / again.stdout.strip()) == pixels(tmp_path / a[1])
    shown = cli("recipe", "show", a[1])
    assert shown.code == 0 and 'prompt = "a red circle on a white background"' in shown.stdout
    assert "seed = 4" in shown.stdout


def test_sizes_not_multiple_of_16_are_padded_then_cropped(cli, recipe, tmp_path):
    res = cli("run", str(recipe), "--set", "width=72", "--set", "height=40", "--set", "count=1",
              "--prompt", "a green triangle")
    assert res.code == 0, res.stderr
    assert "not a multiple of 16" in res.stderr and "80x48" in res.stderr
    with Image.open(tmp_path / res.stdout.strip()) as im:
        assert im.size == (72, 40)


def test_guidance_conventions_give_identical_images(cli, recipe, tmp_path):
    common = ["--set", 'model.preset="krea2-nano-raw"', "--set", "count=1", "--prompt", "a red circle", "-q"]
    krea = cli("run", str(recipe), *common, "--set", "sampler.guidance=2.0", "--set", 'output.name="k"')
    std = cli("run", str(recipe), *common, "--set", "sampler.guidance=3.0", "--set", 'sampler.convention="standard"',
              "--set", 'output.name="s"')
    off = cli("run", str(recipe), *common, "--set", "sampler.guidance=0.0", "--set", 'output.name="o"')
    assert krea.code == std.code == off.code == 0, (krea.stderr, std.stderr)
    assert pixels(tmp_path / krea.stdout.strip()) == pixels(tmp_path / std.stdout.strip())
    assert pixels(tmp_path / krea.stdout.strip()) != pixels(tmp_path / off.stdout.strip())


def _copy_nano(tmp_path) -> Path:
    import shutil

    dest = tmp_path / "nano"
    shutil.copytree(NANO, dest)
    return dest


@pytest.mark.parametrize("case", ["vae-as-dit", "lora-as-dit", "truncated", "not-safetensors", "missing",
                                  "pickle", "pipeline-root"])
def test_bad_weights_exit_4_with_one_clear_message(cli, recipe, tmp_path, case):
    nano = _copy_nano(tmp_path)
    dit = nano / "turbo" / "model.safetensors"
    expect = {
        "vae-as-dit": (str(nano / "vae" / "model.safetensors"), "VAE"),
        "lora-as-dit": (str(tmp_path / "lora.safetensors"), "LoRA"),
        "truncated": (str(dit), "truncated"),
        "not-safetensors": (str(tmp_path / "junk.safetensors"), "not a safetensors file"),
        "missing": (str(tmp_path / "nope.safetensors"), "not found"),
        "pickle": (str(tmp_path / "model.ckpt"), "pickled"),
        "pipeline-root": (str(tmp_path / "pipe"), "transformer/"),
    }[case]
    if case == "truncated":
        data = dit.read_bytes()
        dit.write_bytes(data[: len(data) - 1000])
    elif case == "not-safetensors":
        Path(expect[0]).write_bytes(b"\x00" * 64)
    elif case == "pickle":
        Path(expect[0]).write_bytes(b"\x80\x04not really")
    elif case == "lora-as-dit":
        import torch
        from safetensors.torch import save_file

        save_file({"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(4, 128),
                   "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(128, 4)}, expect[0])
    elif case == "pipeline-root":
        (tmp_path / "pipe" / "transformer").mkdir(parents=True)
        (tmp_path / "pipe" / "model_index.json").write_text("{}")
    res = cli("run", str(recipe), "--set", f'model.weights.dit="{expect[0]}"')
    assert res.code == 4, res.stderr
    assert expect[1] in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_ctrl_c_keeps_finished_images_and_leaves_no_partial_file(isolated_env, recipe, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "krea2kit", "run", str(recipe), "--set", "count=40", "--set", "sampler.steps=4"],
        cwd=tmp_path, env=isolated_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()  # wait until one image is finished
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    written = sorted((tmp_path / "out").iterdir())
    assert first and (tmp_path / first) in written
    for path in written:
        assert path.suffix == ".png" and not path.name.startswith(".")
        with Image.open(path) as im:
            im.load()  # every file left is a whole image
    assert len(written) < 41


def test_colour_follows_no_color_and_the_color_option(cli, recipe):
    # an error message is styled ("error:" in bold red) only when colour is on
    forced = cli("--color", "always", "run", str(recipe), "--dry-run", "--set", "sampler.steps=0")
    assert forced.code == 2 and "\x1b[" in forced.stderr
    plain = cli("run", str(recipe), "--dry-run", "--set", "sampler.steps=0")
    assert plain.code == 2 and "\x1b[" not in plain.stderr
    never = cli("--color", "never", "run", str(recipe), "--dry-run", "--set", "sampler.steps=0")
    assert "\x1b[" not in never.stderr
