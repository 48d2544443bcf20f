"""``krea2kit train`` end to end through the real CLI on the nano family: the adapter it
writes runs on nano Turbo with [[loras]] (LoRA and LoKr, every layout), a resumed run writes
the same file as a straight one, a NaN stops with exit 1, bad recipes are exit 2 with file,
key and fix, ``recipe check`` / ``recipe schema --train`` know training recipes, and a slider
trains and sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RECIPE = """\
schema = "krea2kit.train/1"
name = "stripes"
steps = 3
checkpoint_every = 2
seed = 3
[base]
preset = "krea2-nano-raw"
[dataset]
path = "data"
resolution = 32
trigger = "striped style"
[adapter]
rank = 2
targets = ["attention"]
[optimizer]
lr = 1e-3
[output]
path = "loras/stripes.safetensors"
"""


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dataset(folder: Path, n: int = 2, caption_missing: bool = False) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (32, 32), (240, 240, 240))
        d = ImageDraw.Draw(im)
        for y in range(0, 32, 6):
            d.rectangle([0, y, 31, y + 2], fill=(10, 10, 10))
        d.ellipse([6, 6, 26, 26], fill=(200, 40 * i, 40))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a circle")
    if caption_missing:
        Image.new("RGB", (32, 32)).save(folder / "lonely.png")
        (folder / "broken.png").write_bytes(b"not a png")
        (folder / "broken.txt").write_text("x")


def _setup(tmp_path: Path, text: str = RECIPE, **kw) -> Path:
    _dataset(tmp_path / "data", **kw)
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def _run_recipe(tmp_path: Path, lora: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'prompt = "striped style, a circle"\nwidth = 32\nheight = 32\n[model]\npreset = "krea2-nano-turbo"\n'
                    f'[sampler]\nsteps = 2\n[[loras]]\npath = "{lora}"\nname = "s"\nstrict = true\n'
                    f'[output]\ndir = "imgs"\n')
    return path


@pytest.mark.parametrize("kind,fmt", [("lora", "diffusers"), ("lokr", "native")])
def test_train_then_run_on_turbo(cli_inproc, tmp_path, kind, fmt):
    _setup(tmp_path)
    res = cli_inproc("train", "train.toml", "--json", "--format", fmt, "--set", f'adapter.kind="{kind}"')
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["path"] == "loras/stripes.safetensors" and info["steps"] == 3 and info["adapter"] == kind
    assert info["checkpoint"].endswith("ckpt-0000003") and info["format"] == fmt
    assert "dataset" in res.stderr and "checkpoint" in res.stderr
    inspect = cli_inproc("lora", "inspect", info["path"], "--json")
    assert inspect.code == 0, inspect.stderr
    assert kind in json.dumps(json.loads(inspect.stdout))
    run = cli_inproc("run", str(_run_recipe(tmp_path, info["path"])), "-q")
    assert run.code == 0, run.stderr
    assert Path(tmp_path / run.stdout.strip()).is_file()
    # the file exists now: a second train refuses to replace it (and names the fix)
    again = cli_inproc("train", "train.toml")
    assert again.code == 2 and "output.path" in again.stderr and "overwrite" in again.stderr


def test_resume_through_the_cli_writes_the_same_file(cli_inproc, tmp_path):
    from safetensors.torch import load_file

    _setup(tmp_path)
    straight = cli_inproc("train", "train.toml", "--steps", "4", "--set", 'output.path="a.safetensors"')
    assert straight.code == 0, straight.stderr
    first = cli_inproc("train", "train.toml", "--steps", "2", "--set", 'output.path="b.safetensors"')
    assert first.code == 0, first.stderr
    no_resume = cli_inproc("train", "train.toml", "--steps", "4", "--set", 'output.path="b.safetensors"',
                           "--set", "output.overwrite=true")
    assert no_resume.code == 2 and "--resume" in no_resume.stderr
    resumed = cli_inproc("train", "train.toml", "--steps", "4", "--resume", "--set", 'output.path="b.safetensors"',
                         "--set", "output.overwrite=true")
    assert resumed.code == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_nan_loss_exits_1_and_keeps_the_checkpoint(cli_inproc, tmp_path, monkeypatch):
    import krea2kit.train.objective as objective

    real = objective.flow_matching_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(objective, "flow_matching_loss", poisoned)
    _setup(tmp_path)
    res = cli_inproc("train", "train.toml")
    assert res.code == 1
    assert "step 3" in res.stderr and "not finite" in res.stderr and "ckpt-0000002" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert (tmp_path / "loras" / "stripes.safetensors.train" / "ckpt-0000002" / "state.json").is_file()
    assert not (tmp_path / "loras" / "stripes.safetensors").exists()


@pytest.mark.parametrize("edit,key,words", [
    (("rank = 2", "rnak = 2"), "adapter.rnak", "did you mean 'rank'"),
    (("steps = 3", 'steps = "3"'), "steps", "valid integer"),
    (('path = "data"', 'path = "nowhere"'), "dataset.path", "does not exist"),
    (('preset = "krea2-nano-raw"', 'preset = "krea2-nano-rawx"'), "base.preset", "unknown model"),
    (('kind = "x"', ""), "adapter.kind", ""),
    (('schema = "krea2kit.train/1"', 'schema = "krea2kit.recipe/1"'), "schema", "krea2kit run"),
    (('targets = ["attention"]', 'targets = ["nothing.*"]'), "adapter.targets", "select no Linear"),
])
def test_bad_recipes_exit_2_naming_file_and_key(cli_inproc, tmp_path, edit, key, words):
    text = RECIPE.replace(*edit) if edit[0] in RECIPE else RECIPE.replace('[adapter]', '[adapter]\nkind = "x"')
    _setup(tmp_path, text)
    res = cli_inproc("train", "train.toml")
    assert res.code == 2, res.stderr
    assert "train.toml" in res.stderr and key in res.stderr and words in res.stderr
    assert "Traceback" not in res.stderr and "loading" not in res.stderr  # refused before any weights load


def test_recipe_check_schema_and_dry_run(cli_inproc, tmp_path):
    _setup(tmp_path, caption_missing=True)
    ok = cli_inproc("recipe", "check", "train.toml")
    assert ok.code == 0 and "training recipe" in ok.stderr
    bad = cli_inproc("recipe", "check", "train.toml", "--set", "caption_dropout=2")
    assert bad.code == 2 and "caption_dropout" in bad.stderr
    schema = json.loads(cli_inproc("recipe", "schema", "--train").stdout)
    assert schema["title"] == "krea2kit training recipe" and "adapter" in schema["properties"]
    dry = cli_inproc("train", "train.toml", "--dry-run", "--json")
    assert dry.code == 0, dry.stderr
    info = json.loads(dry.stdout)
    assert info["images"] == 2 and info["skipped"] == 2 and info["memory"]["peak_bytes"] > 0
    assert "lonely.png" in dry.stderr and "broken.png" in dry.stderr
    assert not (tmp_path / "loras").exists()
    for command in (("train", "train.toml", "--dry-run"), ("recipe", "check", "train.toml")):
        nothing = cli_inproc(*command, "--set", 'adapter.targets=["nothing.*"]')
        assert nothing.code == 2 and "adapter.targets" in nothing.stderr and "select no Linear" in nothing.stderr
    turbo = cli_inproc("train", "train.toml", "--dry-run", "--set", 'base.preset="krea2-nano-turbo"')
    assert turbo.code == 0 and "known mistake" in turbo.stderr  # said before anything is trained


@pytest.mark.slow
def test_slider_trains_and_sweeps(cli_inproc, tmp_path):
    (tmp_path / "slider.toml").write_text("""\
schema = "krea2kit.train/1"
name = "size"
steps = 2
checkpoint_every = 2
[base]
preset = "krea2-nano-raw"
[slider]
target = "a circle"
positive = "a large circle"
negative = "a small circle"
preserve = ["red"]
width = 32
height = 32
denoise_steps = 1
[adapter]
rank = 2
targets = ["attention"]
[output]
path = "loras/size.safetensors"
""")
    res = cli_inproc("train", "slider.toml", "--json")
    assert res.code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["mode"] == "slider" and info["slider_recipe"] == "loras/size.slider.toml"
    inspect = json.loads(cli_inproc("lora", "inspect", info["path"], "--json").stdout)
    assert "a large circle" in json.dumps(inspect)
    sweep = cli_inproc("run", info["slider_recipe"], "--sweep", "size=-1:1:3", "--set", "sampler.steps=2",
                       "--set", 'output.dir="sweep"')
    assert sweep.code == 0, sweep.stderr
    lines = sweep.stdout.split()
    assert len(lines) == 4 and lines[-1].endswith("-sweep-size.png")


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_resumed_run_matches_a_straight_one(cli_inproc, isolated_env, tmp_path):
    """A real SIGINT to `krea2kit train`: exit 130, complete checkpoints only; `--resume`
    then ends where an uninterrupted run ends, bit for bit (one thread in both)."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    _setup(tmp_path, RECIPE.replace("steps = 3", "steps = 100000"))
    work = tmp_path / "loras" / "stripes.safetensors.train"
    proc = subprocess.Popen([sys.executable, "-m", "krea2kit", "train", "train.toml", "--threads", "1"],
                            cwd=tmp_path, env=isolated_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(work.glob("ckpt-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out == "" and "interrupted" in err
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no half-written checkpoint left
    last = max(int(p.name[5:]) for p in work.glob("ckpt-*"))
    target = str(last + 2)
    resumed = cli_inproc("train", "train.toml", "--resume", "--steps", target)
    assert resumed.code == 0, resumed.stderr
    straight = cli_inproc("train", "train.toml", "--steps", target, "--set", 'output.path="s.safetensors"')
    assert straight.code == 0, straight.stderr
    a, b = load_file(str(tmp_path / "loras" / "stripes.safetensors")), load_file(str(tmp_path / "s.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
