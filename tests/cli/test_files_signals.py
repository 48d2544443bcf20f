"""Files, signals and non-finite results through the real CLI (issue 12): SIGTERM is
handled like Ctrl-C, no temporary file survives either, two runs into one folder keep
every image, every command follows the overwrite rule, NaN weights stop the run (exit 4)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

NANO = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights"

RECIPE = """
seed = 3
width = 64
height = 64
prompt = "a red circle on a white background"
count = 2
[sampler]
steps = 2
[output]
dir = "out"
name = "img-{index:02d}"
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def _all_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_whole_images(folder: Path) -> None:
    for path in folder.iterdir():
        assert path.suffix == ".png" and not path.name.startswith("."), path.name
        with Image.open(path) as im:
            im.load()  # every file left is a whole image


# A signal delivered while the image's temporary file is open and half written: the most
# likely moment to leave a temporary file behind. Deterministic: krea2kit's own PNG save
# (the one with a pnginfo) writes half, signals this process, then waits to be interrupted.
_SIGNAL_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys, time
    from PIL import Image

    real_save = Image.Image.save
    SIG = getattr(signal, sys.argv[1])

    def save(self, fp, *args, **kwargs):
        if "pnginfo" not in kwargs:
            return real_save(self, fp, *args, **kwargs)
        fp.write(b"\\x89PNG\\r\\n\\x1a\\n half an image")
        fp.flush()
        os.kill(os.getpid(), SIG)
        time.sleep(30)  # the handler raises here
        raise SystemExit("the signal did not interrupt the write")

    Image.Image.save = save
    from krea2kit.cli import main
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("sig, code, word", [
    ("SIGTERM", 143, "terminated"),
    pytest.param("SIGINT", 130, "interrupted", marks=pytest.mark.slow),
])
def test_a_signal_while_an_image_is_written_leaves_no_file_at_all(isolated_env, recipe, tmp_path, sig, code, word):
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_WRITING, sig, "run", str(recipe)],
                          cwd=tmp_path, env=isolated_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert word in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""
    assert _all_files(tmp_path / "out") == []  # neither the image nor its temporary file


@pytest.mark.slow
def test_sigterm_mid_run_keeps_finished_images_and_exits_143(isolated_env, recipe, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "krea2kit", "run", str(recipe), "--set", "count=40", "--set", "sampler.steps=4"],
        cwd=tmp_path, env=isolated_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()  # wait until one image is finished
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    written = _all_files(tmp_path / "out")
    assert first and Path(first).name in written and len(written) < 40
    assert all(Path(line).name in written for line in [first, *out.splitlines()])  # every reported path exists
    _assert_whole_images(tmp_path / "out")


@pytest.mark.slow
def test_two_runs_into_one_folder_keep_every_image(isolated_env, recipe, tmp_path):
    runs = [subprocess.Popen([sys.executable, "-m", "krea2kit", "run", str(recipe), "-q"], cwd=tmp_path,
                             env=isolated_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    paths = [line for out, _ in outputs for line in out.splitlines()]
    assert len(paths) == 4 and len(set(paths)) == 4  # a name is never given twice
    assert sorted(Path(p).name for p in paths) == _all_files(tmp_path / "out")
    _assert_whole_images(tmp_path / "out")


def _nan_copy(tmp_path: Path, part: str, key_part: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"nan-{part}"
    folder.mkdir()
    for extra in (NANO / part).iterdir():
        if extra.name != "model.safetensors":
            (folder / extra.name).write_bytes(extra.read_bytes())
    state = load_file(str(NANO / part / "model.safetensors"))
    key = next(k for k in state if key_part in k and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(folder / "model.safetensors"))
    return folder / "model.safetensors" if part == "turbo" else folder


@pytest.mark.parametrize("role, part, key_part, words", [
    ("dit", "turbo", "attn", "transformer"),
    pytest.param("vae", "vae", "decoder", "VAE", marks=pytest.mark.slow),
])
def test_nan_weights_stop_the_run_with_exit_4_naming_the_weights(cli, recipe, tmp_path, role, part, key_part,
                                                                   words):
    weights = _nan_copy(tmp_path, part, key_part)
    res = cli("run", str(recipe), "--set", f'model.weights.{role}="{weights}"')
    assert res.code == 4, res.stderr
    assert f"model.weights.{role}" in res.stderr and str(weights) in res.stderr and words in res.stderr
    assert "NaN" in res.stderr and "Traceback" not in res.stderr and res.stdout == ""
    assert _all_files(tmp_path / "out") == []  # no all-black image


def test_vae_roundtrip_follows_the_overwrite_rule(cli, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    dest = tmp_path / "in-roundtrip.png"
    dest.write_bytes(b"my own file")
    refused = cli("vae", "roundtrip", str(src), "--model", "krea2-nano-turbo")
    assert refused.code == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr and dest.read_bytes() == b"my own file"
    same = cli("vae", "roundtrip", str(src), "--out", str(src), "--overwrite")
    assert same.code == 2 and "input" in same.stderr
    replaced = cli("vae", "roundtrip", str(src), "--model", "krea2-nano-turbo", "--overwrite")
    assert replaced.code == 0, replaced.stderr
    assert replaced.stdout.strip() == str(dest)
    with Image.open(dest) as im:
        assert im.size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["in-roundtrip.png", "in.png"]
