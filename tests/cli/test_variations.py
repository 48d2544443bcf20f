"""Variation seeds (``[variation]``, AUTOMATIC1111's subseed semantics) and ``[matrix]`` recipes,
through the real CLI on the embedded nano model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from krea2kit.output.metadata import parse_parameters, read_image_metadata
from krea2kit.sampling import initial_noise, slerp_noise

BASE = """
prompt = "a red circle on a white background"
seed = 3
width = 64
height = 64
[sampler]
steps = 2
[output]
dir = "out"
name = "{recipe}-{index:02d}"
overwrite = true
"""


def pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def render(cli_inproc, tmp_path, name: str, extra: str = "", *args: str) -> list[str]:
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(BASE + extra)
    res = cli_inproc("run", str(recipe), *args)
    assert res.code == 0, res.stderr
    return res.stdout.splitlines()


def variation(seed: int, strength: float, **more) -> str:
    lines = [f"seed = {seed}", f"strength = {strength}"] + [f"{k} = {json.dumps(v)}" for k, v in more.items()]
    return "[variation]\n" + "\n".join(lines) + "\n"


# --- the noise itself ------------------------------------------------------------------------


def test_slerp_keeps_the_ends_exact_and_the_norm_in_between():
    base, var = initial_noise(3, 64, 64), initial_noise(100, 64, 64)
    assert torch.equal(slerp_noise(0.0, base, var), base)
    assert torch.equal(slerp_noise(1.0, base, var), var)
    mid = slerp_noise(0.5, base, var)
    assert not torch.equal(mid, base) and not torch.equal(mid, var)
    # a great circle, per (channel, column) over the rows: the column norms stay between the ends'
    # (a linear mix of two nearly orthogonal noises would shrink them by about 1/sqrt(2))
    n = lambda t: torch.linalg.vector_norm(t, dim=2)  # noqa: E731
    assert torch.all(n(mid) >= torch.minimum(n(base), n(var)) * 0.999)
    # the same variation noise twice: nothing moves (the near-parallel linear branch)
    assert torch.allclose(slerp_noise(0.3, base, base.clone()), base, atol=1e-6)


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_strength_0_is_the_plain_image_and_1_the_variation_seeds_image(cli_inproc, tmp_path):
    plain = render(cli_inproc, tmp_path, "plain")[0]
    zero = render(cli_inproc, tmp_path, "zero", variation(100, 0.0))[0]
    assert pixels(tmp_path / zero) == pixels(tmp_path / plain)

    one = render(cli_inproc, tmp_path, "one", variation(100, 1.0))[0]
    seed100 = render(cli_inproc, tmp_path, "seed100", "", "--set", "seed=100")[0]
    assert pixels(tmp_path / one) == pixels(tmp_path / seed100)

    half = render(cli_inproc, tmp_path, "half", variation(100, 0.5))[0]
    assert pixels(tmp_path / half) not in (pixels(tmp_path / plain), pixels(tmp_path / seed100))

    # recorded as A1111 writes it, and only when the strength is not 0
    params = parse_parameters(read_image_metadata(tmp_path / half)["parameters"])["params"]
    assert params["Variation seed"] == "100" and params["Variation seed strength"] == "0.5"
    assert "Variation seed" not in parse_parameters(read_image_metadata(tmp_path / zero)["parameters"])["params"]


@pytest.mark.slow
def test_an_image_does_not_depend_on_its_batch(cli_inproc, tmp_path):
    batch = render(cli_inproc, tmp_path, "batch", variation(100, 0.5), "--set", "count=3", "--json")
    records = [json.loads(line) for line in batch]
    assert [(r["seed"], r["variation_seed"], r["variation_strength"]) for r in records] == [
        (3, 100, 0.5), (4, 101, 0.5), (5, 102, 0.5)]
    # image 2 alone: its own seed and its own variation seed
    alone = render(cli_inproc, tmp_path, "alone", variation(100, 0.5),
                   "--set", "seed=5", "--set", "variation.seed=102")[0]
    assert pixels(tmp_path / alone) == pixels(tmp_path / records[2]["path"])
    # per_image = false: every image shares the variation seed
    shared = render(cli_inproc, tmp_path, "shared", variation(100, 0.5, per_image=False), "--set", "count=2",
                    "--dry-run", "--json")
    assert [json.loads(line)["variation_seed"] for line in shared] == [100, 100]

    # the image's own recipe carries its resolved variation seed and makes the same pixels again
    again = cli_inproc("run", str(tmp_path / records[2]["path"]), "--set", 'output.dir="again"')
    assert again.code == 0, again.stderr
    assert pixels(tmp_path / again.stdout.strip()) == pixels(tmp_path / records[2]["path"])


# --- [matrix] --------------------------------------------------------------------------------

MATRIX = """
[matrix]
seed = [1, 2]
guidance = [0.0, 2.0]
[matrix.prompt]
color = ["red", "blue"]
"""


def test_matrix_dry_run_lists_every_cell_in_order(cli_inproc, tmp_path):
    recipe = tmp_path / "m.toml"
    recipe.write_text(BASE.replace("a red circle", "a {matrix.color} circle") + MATRIX)
    res = cli_inproc("run", str(recipe), "--dry-run", "--json")
    assert res.code == 0, res.stderr
    jobs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [j["index"] for j in jobs] == list(range(8))
    assert [(j["matrix"]["prompt.color"], j["seed"], j["matrix"]["guidance"]) for j in jobs] == [
        (c, s, g) for c in ("red", "blue") for s in (1, 2) for g in (0.0, 2.0)]
    assert {j["prompt"] for j in jobs} == {"a red circle on a white background", "a blue circle on a white background"}
    assert "8 image(s) in a 8-cell matrix" in res.stderr

    text = cli_inproc("run", str(recipe), "--dry-run", "--set", "count=2")
    lines = text.stdout.splitlines()
    assert len(lines) == 16
    assert lines[0].split("\t")[:4] == ["0", "1", "64x64", "color=red, seed=1, guidance=0"]
    assert lines[1].split("\t")[:2] == ["1", "2"]  # count: seed + i inside the cell
    assert lines[-1].split("\t")[3] == "color=blue, seed=2, guidance=2"


@pytest.mark.slow
def test_matrix_renders_plain_recipes_and_a_labelled_sheet(cli_inproc, tmp_path):
    recipe = tmp_path / "grid.toml"
    recipe.write_text(BASE + "\n[matrix]\nseed = [7, 8]\nsteps = [1, 2]\n", encoding="utf-8")
    res = cli_inproc("run", str(recipe), "--set", "output.sheet=true", "--json")
    assert res.code == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    images, sheet = lines[:-1], lines[-1]
    assert [(r["seed"], r["steps"]) for r in images] == [(7, 1), (7, 2), (8, 1), (8, 2)]
    assert len({r["path"] for r in images}) == 4  # indices run on across cells: no name collides
    assert sheet["matrix"] == {"seed": [7, 8], "steps": [1, 2]}

    # each image's recipe is the plain recipe of its cell: no [matrix], its own values
    recorded = read_image_metadata(tmp_path / images[3]["path"])["krea2kit"]["recipe"]
    assert recorded.get("matrix") is None and recorded["seed"] == 8 and recorded["sampler"]["steps"] == 2

    with Image.open(tmp_path / sheet["contact_sheet"]) as im:
        grid = im.convert("RGB")
    # two columns (steps), two rows (seeds) of 64x64 cells under the 14-pixel label band,
    # row labels to the left
    left = grid.width - 2 * 64
    assert grid.height == 14 + 2 * 64 and left > 20
    assert grid.crop((left + 64, 14 + 64, grid.width, grid.height)).tobytes() == pixels(tmp_path / images[3]["path"])
    assert grid.crop((left, 14, left + 64, 14 + 64)).tobytes() == pixels(tmp_path / images[0]["path"])
    band = grid.crop((left, 0, grid.width, 14)).getcolors(10000)
    assert len(band) > 1  # the column labels are drawn
    row_labels = grid.crop((0, 14, left, grid.height)).getcolors(10000)
    assert len(row_labels) > 1


@pytest.mark.parametrize("extra, key, suggestion", [
    ("[matrix]\nseeds = [1, 2]\n", "seeds", "'seed'"),
    ("[matrix]\nseed = [1]\n[matrix.prompt]\ncolour = [\"red\"]\n", "{matrix.color}", "'colour'"),
    ("[matrix]\nseed = [1]\n[matrix.lora]\nstyel = [0.5]\n", "matrix.lora.styel", None),
    ("[variation]\nseed = 1\nstrenght = 0.5\n", "strenght", "'strength'"),
    ("[variation]\nseed = 1\nstrength = 1.5\n", "variation.strength", None),
])
def test_bad_matrix_and_variation_keys_exit_2(cli_inproc, tmp_path, extra, key, suggestion):
    recipe = tmp_path / "bad.toml"
    prompt = "a {matrix.color} circle" if "colour" in extra else "a red circle"
    recipe.write_text(BASE.replace("a red circle", prompt) + extra)
    res = cli_inproc("run", str(recipe), "--dry-run")
    assert res.code == 2, res.stderr
    assert key in res.stderr and "Traceback" not in res.stderr
    if suggestion:
        assert f"did you mean {suggestion}" in res.stderr
    assert res.stdout == ""


def test_an_unused_fragment_is_named(cli_inproc, tmp_path):
    recipe = tmp_path / "unused.toml"
    recipe.write_text(BASE + "[matrix]\n[matrix.prompt]\ncolor = [\"red\"]\n")
    res = cli_inproc("run", str(recipe), "--dry-run")
    assert res.code == 2 and "matrix.prompt.color" in res.stderr and "{matrix.color}" in res.stderr


def test_matrix_lora_strengths_and_slider_values_reach_each_cells_plan(cli_inproc, tmp_path):
    from safetensors.torch import save_file

    from krea2kit.api import Session
    from krea2kit.models.dit_loader import dit_config_from_checkpoint
    from krea2kit.models.weights import open_checkpoint
    from krea2kit.api import load_recipe
    from krea2kit.recipe.matrix import expand

    nano = Path(__file__).resolve().parents[2] / "src" / "krea2kit" / "nano" / "weights"
    features = dit_config_from_checkpoint(open_checkpoint(nano / "turbo")).features
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_blocks_0_attn_wq.lora_down.weight": torch.randn(4, features, generator=g),
               "lora_unet_blocks_0_attn_wq.lora_up.weight": torch.randn(features, 4, generator=g),
               "lora_unet_blocks_0_attn_wq.alpha": torch.tensor(4.0)}, str(tmp_path / "style.safetensors"))
    recipe = tmp_path / "lm.toml"
    recipe.write_text(BASE + f"""
[[loras]]
path = "{tmp_path / 'style.safetensors'}"
[[loras]]
name = "other"
path = "{tmp_path / 'style.safetensors'}"
[[sliders]]
name = "amount"
lora = "other"
range = [-2.0, 2.0]
[matrix.lora]
style = [0.0, 0.5]
[matrix.slider]
amount = [-1.0, 1.0]
""")
    res = cli_inproc("run", str(recipe), "--dry-run", "--json")
    assert res.code == 0, res.stderr
    assert [json.loads(line)["matrix"] for line in res.stdout.splitlines()] == [
        {"lora.style": s, "slider.amount": a} for s in (0.0, 0.5) for a in (-1.0, 1.0)]

    axes, cells = expand(load_recipe(str(recipe)))
    session = Session()
    got = [(p.recipe.loras[0].strength, p.recipe.loras[1].strength, p.recipe.sliders[0].value)
           for p in (session.plan(c.loaded) for c in cells)]
    assert got == [(0.0, 1.0, -1.0), (0.0, 1.0, 1.0), (0.5, 1.0, -1.0), (0.5, 1.0, 1.0)]
    # planning the [matrix] recipe itself is refused with the way out named
    from krea2kit.errors import RecipeError

    with pytest.raises(RecipeError, match="several runs"):
        session.plan(load_recipe(str(recipe)))
