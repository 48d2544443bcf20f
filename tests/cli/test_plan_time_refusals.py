"""Recipe errors found when a run is planned, before any weights load (issue 12), through the
real CLI: an output folder that cannot be created (even as root, for whom access() says yes
to /proc), and strict types in the filters' and the slider kind's own options (a boolean is
not a threshold, a string is not a step), while TOML arrays still give the slider's pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from krea2kit.errors import EXIT_USAGE

RECIPE = 'prompt = "a red circle"\nwidth = 64\nheight = 64\n[sampler]\nsteps = 2\n'


# --------------------------------------------------------------------------- output folder


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("folder", ["/proc/nope/x", "/proc"])
def test_an_output_folder_that_cannot_be_made_is_exit_2_before_loading(cli, tmp_path, folder):
    (tmp_path / "r.toml").write_text(RECIPE + f'[output]\ndir = "{folder}"\n')
    res = cli("run", "r.toml")  # a real run, in a subprocess: it must stop before loading
    assert res.code == EXIT_USAGE, res.stderr
    assert f"r.toml: output.dir: the output folder {folder}" in res.stderr
    assert "loading" not in res.stderr and "internal error" not in res.stderr and res.stdout == ""
    dry = cli("run", "r.toml", "--dry-run")
    assert dry.code == EXIT_USAGE and "output.dir" in dry.stderr


def test_an_output_folder_under_a_file_is_exit_2(cli_inproc, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "r.toml").write_text(RECIPE + '[output]\ndir = "file/sub"\n')
    res = cli_inproc("recipe", "check", "r.toml")
    assert res.code == EXIT_USAGE and "output.dir: the output folder file/sub cannot be created" in res.stderr


def test_checking_an_output_folder_leaves_nothing_behind(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE + '[output]\ndir = "new/folder"\n')
    res = cli_inproc("run", "r.toml", "--dry-run")
    assert res.code == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # no folder made, no probe left


# --------------------------------------------------------------------------- filter options


@pytest.mark.parametrize("table, value, words", [
    ("nsfw-image", "threshold = true", "threshold: input should be a valid number"),
    ("nsfw-image", 'threshold = "0.5"', "threshold: input should be a valid number"),
    ("nsfw-image", "threshold = nan", "threshold: input should be a finite number"),
    ("prompt-rules", 'extra_terms = {sexual_explicit = "one"}', "extra_terms.sexual_explicit: input should be a valid list"),
    ("prompt-rules", "extra_terms = {sexual_explicit = [1]}", "extra_terms.sexual_explicit[0]: input should be a valid string"),
])
def test_filter_options_are_strict(cli_inproc, tmp_path, table, value, words):
    (tmp_path / "r.toml").write_text(RECIPE + f'[safety.settings.{table}]\n{value}\n')
    res = cli_inproc("run", "r.toml", "--dry-run")
    assert res.code == EXIT_USAGE, res.stderr
    assert f"r.toml: safety.settings.{table}.{words}" in res.stderr, res.stderr


def test_filter_options_of_the_right_type_pass(cli_inproc, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE + "[safety.settings.nsfw-image]\nthreshold = 0\n"
                                              '[safety.settings.prompt-rules]\nextra_terms = {sexual_explicit = ["zorb"]}\n')
    res = cli_inproc("run", "r.toml", "--dry-run")
    assert res.code == 0, res.stderr


# --------------------------------------------------------------------------- slider options


@pytest.fixture
def lora(tmp_path) -> Path:
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "style.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    return path


def _slider_recipe(lora: Path, keys: str) -> str:
    return RECIPE + f'[[loras]]\npath = "{lora}"\nname = "style"\n[[sliders]]\nname = "amount"\nlora = "style"\n{keys}\n'


@pytest.mark.parametrize("keys, field", [
    ("gain = true", "gain"),
    ('start_step = "1"', "start_step"),
    ("start_step = 1.0", "start_step"),
    ("end_step = false", "end_step"),
    ("default = true", "default"),
    ("range = [true, 2.0]", "range[0]"),
    ('points = [[0.0, "1"], [1.0, 2.0]]', "points[0][1]"),
    ("description = 3", "description"),
])
def test_slider_options_are_strict(cli_inproc, tmp_path, lora, keys, field):
    (tmp_path / "r.toml").write_text(_slider_recipe(lora, keys))
    res = cli_inproc("run", "r.toml", "--dry-run")
    assert res.code == EXIT_USAGE, res.stderr
    assert f"sliders[0].{field}:" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_slider_arrays_and_integers_still_read(cli_inproc, tmp_path, lora):
    """TOML gives pairs as arrays (not tuples) and whole numbers as integers: both still valid."""
    (tmp_path / "r.toml").write_text(_slider_recipe(
        lora, "value = 1\nrange = [-2, 2]\ngain = 2\nstart_step = 1\nend_step = 2\npoints = [[0, 0], [1, 1.5]]"))
    res = cli_inproc("run", "r.toml", "--dry-run", "--json")
    assert res.code == 0, res.stderr
    shown = cli_inproc("recipe", "show", "r.toml", "--json")
    slider = json.loads(shown.stdout)["sliders"][0]
    assert slider["range"] == [-2, 2] and slider["points"] == [[0, 0], [1, 1.5]]
