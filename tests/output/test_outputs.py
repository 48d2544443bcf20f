"""Where images go: names claimed atomically by the run's OutputPlanner, and everything
about output.* that can be wrong refused at plan time (exit 2, before any weights load)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from krea2kit.output.metadata import ImageMetadata
from krea2kit.runtime.outputs import OutputInfo, OutputPlanner

RECIPE = 'prompt = "a red circle"\ncount = 2\nseed = 3\n[output]\ndir = "out"\nname = "img-{index:02d}"\n'


def _plan(tmp_path, monkeypatch, *overrides, text=RECIPE):
    from krea2kit.api import Session

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KREA2KIT_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "r.toml").write_text(text)
    return Session().plan("r.toml", overrides=list(overrides))


def _info(job, colour):
    return OutputInfo(metadata=ImageMetadata(parameters=f"colour {colour}"), prompt=job.prompt, negative="",
                      seed=job.seed, index=job.index)


def _writer(plan):
    return plan.parts["writer"].load_part()


def test_two_runs_given_the_same_name_both_keep_their_image(tmp_path, monkeypatch):
    """The lost-image race, made deterministic: both runs pick "img-00.png" while it is still
    free; the second write must take the next name, never replace the first image."""
    plan = _plan(tmp_path, monkeypatch)
    writer = _writer(plan)
    run_a, run_b = OutputPlanner(plan), OutputPlanner(plan)
    job = plan.jobs[0]
    assert run_a.path_for(job, writer) == run_b.path_for(job, writer) == Path("out/img-00.png")
    a = run_a.write(job, writer, Image.new("RGB", (8, 8), (255, 0, 0)), _info(job, "red"))
    b = run_b.write(job, writer, Image.new("RGB", (8, 8), (0, 0, 255)), _info(job, "blue"))
    assert (a, b) == (Path("out/img-00.png"), Path("out/img-00-2.png"))
    with Image.open(a) as im_a, Image.open(b) as im_b:
        assert im_a.getpixel((0, 0)) == (255, 0, 0) and im_b.getpixel((0, 0)) == (0, 0, 255)


def test_overwrite_true_replaces_atomically(tmp_path, monkeypatch):
    plan = _plan(tmp_path, monkeypatch, "output.overwrite=true")
    writer, job = _writer(plan), plan.jobs[0]
    first = OutputPlanner(plan).write(job, writer, Image.new("RGB", (8, 8), (255, 0, 0)), _info(job, "red"))
    second = OutputPlanner(plan).write(job, writer, Image.new("RGB", (8, 8), (0, 255, 0)), _info(job, "green"))
    assert first == second
    with Image.open(second) as im:
        assert im.getpixel((0, 0)) == (0, 255, 0)
    assert os.listdir(tmp_path / "out") == ["img-00.png"]


@dataclass
class _ExclusiveWriter:
    """A plugin writer that follows the contract the simple way: FileExistsError for a taken name."""

    extension: str = ".txt"

    def write(self, image, path, info):
        with open(path, "x") as fp:  # exclusive create
            fp.write(str(info.index))
        return path


def test_a_plugin_writer_raising_file_exists_gets_the_next_name(tmp_path, monkeypatch):
    plan = _plan(tmp_path, monkeypatch)
    job = plan.jobs[0]
    a, b = OutputPlanner(plan), OutputPlanner(plan)
    a.path_for(job, _ExclusiveWriter())
    b.path_for(job, _ExclusiveWriter())  # both runs hold "img-00.txt" as their hint
    assert a.write(job, _ExclusiveWriter(), None, _info(job, "x")) == Path("out/img-00.txt")
    assert b.write(job, _ExclusiveWriter(), None, _info(job, "x")) == Path("out/img-00-2.txt")


# -- plan-time refusals, through the real CLI ---------------------------------------------------

@pytest.mark.parametrize("setting, key, words", [
    ('output.name="{index:0300d}"', "output.name", "not allowed"),
    ('output.name="{index.__class__}"', "output.name", "attribute or index access"),
    ('output.name="{seed[0]}"', "output.name", "attribute or index access"),
    ('output.name="."', "output.name", "unsafe"),
    ('output.name=".."', "output.name", "unsafe"),
    ('output.name="a/"', "output.name", "unsafe"),
    ('output.name="' + "x" * 250 + '"', "output.name", "this file system allows"),
    ('output.name="{prompt_slug}/' + "y" * 256 + '"', "output.name", "this file system allows"),
    ('output.quality=80', "output.quality", "not png"),
    ('output.dir="afile"', "output.dir", "is a file"),
    ('output.dir="afile/below"', "output.dir", "cannot be created"),
    ('output.name="afile/{index}"', "output.name", "is a file"),
    ('output.dir="a\\u0000b"', "output.dir", "control character"),
    ('output.dir="a\\nb"', "output.dir", "control character"),
])
def test_output_mistakes_are_recipe_errors_before_anything_loads(cli_inproc, tmp_path, setting, key, words):
    (tmp_path / "r.toml").write_text(RECIPE.replace('dir = "out"', 'dir = "."'))
    (tmp_path / "afile").write_text("not a folder")
    for command in (("recipe", "check", "r.toml"), ("run", "r.toml")):
        res = cli_inproc(*command, "--set", setting)
        assert res.code == 2, res.stderr
        assert f"{key}:" in res.stderr and words in res.stderr, res.stderr
        assert "internal error" not in res.stderr and "loading" not in res.stderr
    assert not any(p.suffix == ".png" for p in tmp_path.rglob("*"))


def test_an_unknown_home_in_output_dir_is_a_plain_folder_name(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    res = cli_inproc("run", "r.toml", "--dry-run", "--set", 'output.dir="~no-such-user-k2k/out"')
    assert res.code == 0, res.stderr


def test_a_long_name_fits_when_overwriting_needs_no_suffix(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    name = "x" * 251  # + ".png" = 255 bytes: fits, but leaves no room for "-2"
    assert cli_inproc("recipe", "check", "r.toml", "--set", f'output.name="{name}"').code == 2
    res = cli_inproc("recipe", "check", "r.toml", "--set", f'output.name="{name}"', "--set", "output.overwrite=true",
                     "--set", "count=1")
    assert res.code == 0, res.stderr


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_output_folder_without_permission_is_a_recipe_error(cli_inproc, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    (tmp_path / "r.toml").write_text(RECIPE.replace('dir = "out"', 'dir = "locked/out"'))
    res = cli_inproc("run", "r.toml")
    assert res.code == 2 and "output.dir" in res.stderr and "not writable" in res.stderr, res.stderr


def test_jpeg_metadata_that_cannot_fit_is_refused_before_rendering(cli_inproc, tmp_path):
    long_prompt = "a quiet harbour at dawn with fishing boats, " * 800  # ~35 kB: UTF-16 EXIF > 64 KiB
    (tmp_path / "r.toml").write_text(f'prompt = "{long_prompt}"\n[output]\nformat = "jpeg"\n')
    res = cli_inproc("run", "r.toml", "--dry-run")
    assert res.code == 2 and "output.format" in res.stderr and "not fit in a JPEG" in res.stderr, res.stderr
    assert "png" in res.stderr  # the fix
    for fix in ('output.format="webp"', "output.metadata=false"):
        assert cli_inproc("run", "r.toml", "--dry-run", "--set", fix).code == 0


def test_files_a_library_writes_get_the_umask_permissions(tmp_path):
    import torch
    from safetensors.torch import save_file

    from krea2kit.files import atomic_save

    old = os.umask(0o022)
    try:
        path = atomic_save(tmp_path / "a.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, str(tmp)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # safetensors alone leaves 0600: unreadable to a server
