"""``krea2kit run --keep-diverse K`` and ``[diversity]`` through the real CLI on the nano model:
exactly K files written, scores in the JSON lines and in each kept image's metadata, the
selection the library makes on the same pixels, and clear exit-2 errors."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from krea2kit.diversity.scores import batch_scores
from krea2kit.diversity.select import select_diverse
from krea2kit.output.metadata import read_image_metadata
from krea2kit.parts.embedders import LabHogEmbedder

RECIPE = """
prompt = "a red circle at the top and a blue square at the bottom, white background"
seed = 5
count = 4
[sampler]
steps = 2
[output]
dir = "out"
"""


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _record(path) -> dict:
    raw = read_image_metadata(path)["krea2kit"]
    return json.loads(raw) if isinstance(raw, str) else raw


def _embed(paths) -> object:
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return LabHogEmbedder().embed(images)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "div.toml"
    path.write_text(RECIPE)
    return path


def test_keep_diverse_writes_only_the_kept_images_with_their_scores(cli_inproc, recipe, tmp_path, one_thread):
    res = cli_inproc("run", str(recipe), "--keep-diverse", "2", "--json")
    assert res.code == 0, res.stderr
    lines = _lines(res.stdout)
    assert [r["index"] for r in lines] == [0, 1, 2, 3]
    kept = [r for r in lines if r["status"] == "ok"]
    dropped = [r for r in lines if r["status"] == "dropped"]
    assert len(kept) == 2 and len(dropped) == 2
    assert all(r["path"] is None and r["sha256"] is None for r in dropped)
    # exactly the kept files, nothing else (no temporary or dropped file left behind)
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == sorted(os.path.basename(r["path"]) for r in kept)

    # every line carries the batch's scores; the kept ones their rank among the kept
    batch = {json.dumps(r["diversity"]["batch"], sort_keys=True) for r in lines}
    assert len(batch) == 1 and lines[0]["diversity"]["batch"]["images"] == 4
    assert 1.0 <= lines[0]["diversity"]["batch"]["vendi"] <= 4.0
    assert sorted(r["diversity"]["rank"] for r in kept) == [0, 1]
    assert all(r["diversity"]["selected"] is False and r["diversity"]["rank"] is None for r in dropped)
    assert all(r["diversity"]["embedder"] == "lab-hog" and r["diversity"]["keep"] == 2 for r in lines)

    # the kept set's scores are those of the written pixels (PNG is lossless)
    paths = [tmp_path / r["path"] for r in kept]
    expected = batch_scores(_embed(paths))
    for r in kept:
        assert r["diversity"]["kept"]["vendi"] == pytest.approx(expected["vendi"], abs=1e-4)
        assert r["diversity"]["kept"]["mean_distance"] == pytest.approx(expected["mean_distance"], abs=1e-4)
        assert r["diversity"]["nearest_distance"] == pytest.approx(expected["mean_distance"], abs=1e-4)

    # ... and each kept image's metadata carries the same scores; its recipe renders it alone
    for r, path in zip(kept, paths):
        record = _record(path)
        assert record["diversity"] == {k: v for k, v in r["diversity"].items() if k != "selected"}
        assert "diversity" not in record["recipe"]
    assert "not written" in res.stderr and "most diverse" in res.stderr


def test_the_kept_images_are_the_ones_the_library_selects(cli_inproc, recipe, tmp_path, one_thread):
    """Scores only (no keep): all four written, with scores; keeping two of them by
    select_diverse on the written pixels picks what --keep-diverse 2 kept."""
    everything = cli_inproc("run", str(recipe), "--json", "--set", 'diversity.embedder="lab-hog"',
                            "--set", "output.dir=all")
    assert everything.code == 0, everything.stderr
    lines = _lines(everything.stdout)
    assert [r["status"] for r in lines] == ["ok"] * 4
    assert all("keep" not in r["diversity"] and r["diversity"]["selected"] for r in lines)
    embeddings = _embed([tmp_path / r["path"] for r in lines])
    assert lines[0]["diversity"]["batch"]["vendi"] == pytest.approx(batch_scores(embeddings)["vendi"], abs=1e-4)
    chosen = sorted(lines[i]["index"] for i in select_diverse(embeddings, 2, "max-min"))

    kept = cli_inproc("run", str(recipe), "--json", "--keep-diverse", "2", "--set", "output.dir=kept")
    assert kept.code == 0, kept.stderr
    assert sorted(r["index"] for r in _lines(kept.stdout) if r["status"] == "ok") == chosen


def test_plain_output_prints_only_written_paths(cli_inproc, recipe, tmp_path, one_thread):
    res = cli_inproc("run", str(recipe), "--keep-diverse", "3", "--set", "diversity.method=\"vendi\"")
    assert res.code == 0, res.stderr
    paths = res.stdout.splitlines()
    assert len(paths) == 3 and all((tmp_path / p).is_file() for p in paths)
    assert len(os.listdir(tmp_path / "out")) == 3


def test_unknown_embedder_is_exit_2_with_a_suggestion(cli_inproc, recipe):
    res = cli_inproc("run", str(recipe), "--set", 'diversity.embedder="lab-hgo"', "--dry-run")
    assert res.code == 2
    assert "diversity.embedder" in res.stderr and "did you mean 'lab-hog'" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli_inproc("run", str(recipe), "--keep-diverse", "2", "--set", 'diversity.embeder="lab-hog"')
    assert res.code == 2 and "diversity.embeder" in res.stderr and "did you mean 'embedder'" in res.stderr


@pytest.mark.parametrize("args, key", [
    (("--keep-diverse", "0"), "--keep-diverse"),
    (("--set", "diversity.keep=0"), "diversity.keep"),
    (("--set", 'diversity.method="random"'), "diversity.method"),
])
def test_bad_values_are_exit_2(cli_inproc, recipe, args, key):
    res = cli_inproc("run", str(recipe), *args, "--dry-run")
    assert res.code == 2, res.stderr
    assert key in res.stderr and "Traceback" not in res.stderr


def test_an_image_never_decides_diversity(tmp_path):
    """[diversity] is a local decision: an image's embedded recipe cannot set it."""
    from krea2kit.recipe.trust import untrusted_recipe

    kept, dropped = untrusted_recipe({"prompt": "x", "diversity": {"keep": 1, "embedder": "clip"}})
    assert "diversity" not in kept
    assert sorted(dropped) == ["diversity.embedder", "diversity.keep"]


def test_each_prompt_is_its_own_batch_and_blocked_prompts_stay_out(cli_inproc, tmp_path, one_thread):
    res = cli_inproc("run", "--prompt", "a red circle on a white background", "--prompt",
                     "explicit sex scene with a 12 year old", "--set", "count=3", "--set", "sampler.steps=2",
                     "--set", 'output.dir="out"', "--keep-diverse", "1", "--json")
    assert res.code == 3, res.stderr  # a prompt was blocked: exit 3, as without [diversity]
    lines = _lines(res.stdout)
    assert sorted(r["index"] for r in lines) == list(range(6))
    first = [r for r in lines if r["index"] < 3]
    second = [r for r in lines if r["index"] >= 3]
    assert sorted(r["status"] for r in first) == ["dropped", "dropped", "ok"]
    assert all(r["diversity"]["batch"]["images"] == 3 for r in first)
    assert all(r["status"] == "blocked" and "diversity" not in r for r in second)
    assert len(os.listdir(tmp_path / "out")) == 1


BLOCK_EVERY_OTHER = """
from krea2kit.hookspecs import hookimpl
from krea2kit.registry import FilterDescriptor
from krea2kit.safety.verdict import Verdict

KREA2KIT_CONTRACT = 2


class EveryOther:
    name = "every-other"
    version = "1"

    def __init__(self):
        self.seen = 0

    def check_image(self, image):
        self.seen += 1
        action = "block" if self.seen % 2 == 0 else "allow"
        return Verdict(self.name, self.version, action, "test" if action == "block" else None, 1.0, "")


def load(options, context):
    return EveryOther()


@hookimpl
def register_filters(register):
    register(FilterDescriptor(name="every-other", summary="blocks every second image", load=load, target="image"))
"""


def test_images_an_image_filter_blocks_are_not_part_of_the_batch(cli_inproc, recipe, tmp_path, one_thread):
    import types

    from krea2kit.plugins import Host, reset_host

    module = types.ModuleType("k2everyother")
    exec(BLOCK_EVERY_OTHER, module.__dict__)
    reset_host(Host(load_entry_points=False, extra_plugins=((module, "krea2kit-every-other"),)))
    try:
        res = cli_inproc("run", str(recipe), "--keep-diverse", "2", "--json")
    finally:
        reset_host(None)
    assert res.code == 3, res.stderr
    lines = _lines(res.stdout)
    assert sorted((r["index"], r["status"]) for r in lines) == [(0, "ok"), (1, "blocked"), (2, "ok"), (3, "blocked")]
    assert all(r["diversity"]["batch"]["images"] == 2 for r in lines if r["status"] == "ok")
    assert len(os.listdir(tmp_path / "out")) == 2


def test_matrix_cells_are_batches_and_dropped_images_are_not_failures(cli_inproc, tmp_path, one_thread):
    recipe = tmp_path / "m.toml"
    recipe.write_text('prompt = "a {matrix.color} circle"\ncount = 2\n[sampler]\nsteps = 2\n'
                      '[matrix.prompt]\ncolor = ["red", "blue"]\n[diversity]\nkeep = 1\n'
                      '[output]\ndir = "out"\nsheet = true\n')
    res = cli_inproc("run", str(recipe), "--json")
    assert res.code == 0, res.stderr  # dropped is not blocked: exit 0
    lines = [r for r in _lines(res.stdout) if "index" in r]
    assert sorted(r["status"] for r in lines) == ["dropped", "dropped", "ok", "ok"]
    assert {r["index"] // 2 for r in lines if r["status"] == "ok"} == {0, 1}  # one kept per cell
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [os.path.basename(r["path"]) for r in lines if r["status"] == "ok"] + ["m-matrix.png"])


def test_recipe_check_checks_the_embedder(cli_inproc, recipe):
    assert cli_inproc("recipe", "check", str(recipe), "--set", "diversity.keep=2").code == 0
    res = cli_inproc("recipe", "check", str(recipe), "--set", 'diversity.embedder="clipp"')
    assert res.code == 2 and "diversity.embedder" in res.stderr and "unknown embedder 'clipp'" in res.stderr
