"""``[[references]]`` through the real CLI on the nano model: strength 0 is the plain image,
a reference's colour pulls the image toward it as its strength rises, several at once,
sliders and sweeps, metadata and ``run IMAGE.png``, and untrusted files refused clearly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
seed = 3
width = 64
height = 64
prompt = "a red circle on a white background"
[sampler]
steps = 4
[output]
dir = "made"
name = "img"
"""

BLUE = (0, 40, 255)
YELLOW = (255, 200, 0)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.float64)


def colour_distance(image: np.ndarray, colour) -> float:
    """Distance of the image's mean colour to ``colour`` (a global statistic: robust to where
    the model puts things, sensitive to the overall palette a reference pulls in)."""
    return float(np.linalg.norm(image.reshape(-1, 3).mean(0) - np.asarray(colour, np.float64)))


@pytest.fixture
def pictures(tmp_path):
    Image.new("RGB", (64, 64), BLUE).save(tmp_path / "blue.png")
    Image.new("RGB", (96, 64), YELLOW).save(tmp_path / "yellow.png")  # another size: framed like [init]
    return tmp_path


@pytest.fixture
def render(cli_inproc, tmp_path, pictures):
    (tmp_path / "r.toml").write_text(RECIPE)

    def run(name: str, *sets: str, recipe: str = "r.toml") -> Path:
        res = cli_inproc("run", recipe, "-q", "--set", "model.device=cpu", "--set", f'output.name="{name}"',
                         *[arg for s in sets for arg in ("--set", s)])
        assert res.code == 0, res.stderr
        return tmp_path / res.stdout.strip()

    return run


def one(image: str, strength: float, mode: str = "in-context", **extra) -> str:
    items = [f'image = "{image}"', f"strength = {strength}", f'mode = "{mode}"'] + [
        f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "{" + ", ".join(items) + "}"


def refs(*entries: str) -> str:
    return "references=[" + ", ".join(entries) + "]"


@pytest.mark.slow  # five nano renders (about 6 s)
@pytest.mark.parametrize("mode", ["in-context", "attention"])
def test_strength_zero_is_the_plain_image_and_the_colour_follows_the_strength(render, mode):
    plain = pixels(render("plain"))
    off = pixels(render("off", refs(one("blue.png", 0.0, mode))))
    assert np.array_equal(off, plain)  # bit for bit: the reference is left out entirely
    distances = [colour_distance(plain, BLUE)]
    for s in (0.5, 1.0, 2.0):
        distances.append(colour_distance(pixels(render(f"s{s}", refs(one("blue.png", s, mode)))), BLUE))
    # measured on nano (steps 4, seed 3): in-context 309 > 291 > 281 > 264, attention 309 > 298 > 288 > 278
    assert all(a - b > 3.0 for a, b in zip(distances, distances[1:])), distances


def test_two_references_at_once_each_with_its_own_strength(render):
    blue = pixels(render("blue", refs(one("blue.png", 2.0))))
    yellow = pixels(render("yellow", refs(one("yellow.png", 2.0, "attention"))))
    both = pixels(render("both", refs(one("blue.png", 2.0), one("yellow.png", 2.0, "attention"))))
    # each reference still pulls: the pair is nearer blue than yellow alone, nearer yellow than blue alone
    assert colour_distance(both, BLUE) < colour_distance(yellow, BLUE) - 3.0
    assert colour_distance(both, YELLOW) < colour_distance(blue, YELLOW) - 3.0
    # and one at 0 is the other alone, bit for bit
    only_blue = pixels(render("only", refs(one("blue.png", 2.0), one("yellow.png", 0.0, "attention"))))
    assert np.array_equal(only_blue, blue)


def test_metadata_and_rerun_from_the_image(render, cli_inproc, tmp_path):
    first = render("first", refs(one("blue.png", 1.5, name="sky"), one("yellow.png", 0.5, "attention", frame=4)))
    with Image.open(first) as im:
        record = json.loads(im.info["krea2kit"])
    # the recipe names the pictures by file name only; the record adds their sha256
    assert [r["image"] for r in record["recipe"]["references"]] == ["blue.png", "yellow.png"]
    got = [{k: r[k] for k in ("name", "file", "sha256", "strength", "mode", "frame")} for r in record["references"]]
    assert got == [
        {"name": "sky", "file": "blue.png", "sha256": hashlib.sha256((tmp_path / "blue.png").read_bytes()).hexdigest(),
         "strength": 1.5, "mode": "in-context", "frame": None},
        {"name": "yellow", "file": "yellow.png",
         "sha256": hashlib.sha256((tmp_path / "yellow.png").read_bytes()).hexdigest(),
         "strength": 0.5, "mode": "attention", "frame": 4},
    ]
    assert str(tmp_path) not in im.info["krea2kit"]  # no local path leaks into the image

    (tmp_path / "elsewhere").mkdir()
    base = ["run", str(first), "-q", "--set", "output.dir=elsewhere"]
    missing = cli_inproc(*base)
    assert missing.code == 2, missing.stderr
    assert "--set references.0.image=" in missing.stderr and "blue.png" in missing.stderr
    assert "Traceback" not in missing.stderr
    half = cli_inproc(*base, "--set", 'references.0.image="blue.png"')
    assert half.code == 2 and "--set references.1.image=" in half.stderr and "yellow.png" in half.stderr

    again = cli_inproc(*base, "--set", 'references.0.image="blue.png"', "--set", 'references.1.image="yellow.png"')
    assert again.code == 0, again.stderr
    assert np.array_equal(pixels(tmp_path / again.stdout.strip()), pixels(first))

    # another picture under the recorded name: the hash says so (a warning, as for LoRA and init
    # files: the user chose the file), and the picture differs
    (tmp_path / "swap").mkdir()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "swap" / "blue.png")
    tampered = cli_inproc(*base, "--set", 'references.0.image="swap/blue.png"',
                          "--set", 'references.1.image="yellow.png"')
    assert tampered.code == 0, tampered.stderr
    assert "not the reference picture" in tampered.stderr and "will differ" in tampered.stderr
    assert not np.array_equal(pixels(tmp_path / tampered.stdout.strip()), pixels(first))
    gone = cli_inproc(*base, "--set", 'references.0.image="gone.png"', "--set", 'references.1.image="yellow.png"')
    assert gone.code == 2 and "references.0.image" in gone.stderr and "not found" in gone.stderr
    assert len(list((tmp_path / "elsewhere").iterdir())) == 2


# (the decompression-bomb and size caps are the [init] loader's, tested in tests/cli/test_img2img.py)
@pytest.mark.parametrize("case", ["missing", "not-an-image", "folder"])
def test_bad_reference_files_stop_before_anything_loads(cli_inproc, tmp_path, pictures, case):
    (tmp_path / "r.toml").write_text(RECIPE)
    target = tmp_path / "bad.png"
    if case == "not-an-image":
        target.write_bytes(b"#!/bin/sh\necho not a picture\n")
    elif case == "folder":
        target.mkdir()
    for extra in ([], ["--dry-run"]):
        res = cli_inproc("run", "r.toml", "-q", *extra, "--set", refs(one("blue.png", 1.0), one("bad.png", 1.0)))
        assert res.code == 2, res.stderr
        assert "references.1.image" in res.stderr and "bad.png" in res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "made").exists()


@pytest.mark.parametrize("setting, words", [
    ('references=[{image = "blue.png", strength = -1}]', "strength"),
    ('references=[{image = "blue.png", mode = "style"}]', "mode"),
    ('references=[{image = "blue.png", strenght = 1}]', "strength"),
    ('references=[{image = "blue.png"}, {image = "blue.png"}]', "both named 'blue'"),
])
def test_bad_reference_settings_are_recipe_errors(cli_inproc, tmp_path, pictures, setting, words):
    (tmp_path / "r.toml").write_text(RECIPE)
    res = cli_inproc("run", "r.toml", "-q", "--dry-run", "--set", setting)
    assert res.code == 2 and words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_relative_paths_start_in_the_recipe_folder(render, tmp_path):
    (tmp_path / "sub" / "pics").mkdir(parents=True)
    Image.new("RGB", (64, 64), BLUE).save(tmp_path / "sub" / "pics" / "ref.png")
    (tmp_path / "sub" / "r.toml").write_text(RECIPE + '\n[[references]]\nimage = "pics/ref.png"\nstrength = 2.0\n')
    nested = pixels(render("nested", recipe="sub/r.toml"))
    direct = pixels(render("direct", refs(one("blue.png", 2.0))))
    assert np.array_equal(nested, direct)  # same picture, found beside the recipe


SLIDER = RECIPE + """
[[references]]
image = "blue.png"
name = "sky"
strength = 1.0

[[sliders]]
name = "sky-amount"
lora = "reference:sky"
range = [0.0, 4.0]
value = 2.0
"""


def test_a_slider_drives_a_reference_and_sweeps(render, cli_inproc, tmp_path):
    (tmp_path / "s.toml").write_text(SLIDER)
    at_two = pixels(render("slid", recipe="s.toml"))
    direct = pixels(render("direct", refs(one("blue.png", 2.0))))
    assert np.array_equal(at_two, direct)  # slider value x reference strength
    at_zero = pixels(render("zero", "sliders.0.value=0.0", recipe="s.toml"))
    assert np.array_equal(at_zero, pixels(render("plain")))

    res = cli_inproc("run", "s.toml", "-q", "--set", "model.device=cpu", "--sweep", "sky-amount=0:2:2")
    assert res.code == 0, res.stderr
    sheet = Path(res.stdout.strip().splitlines()[-1])
    assert sheet.name.endswith("-sweep-sky-amount.png") and (tmp_path / sheet).is_file()

    bad = cli_inproc("run", "s.toml", "-q", "--dry-run", "--set", 'sliders.0.lora="reference:cloud"')
    assert bad.code == 2 and "reference:cloud" in bad.stderr, bad.stderr


def test_an_image_never_names_a_reference_file():
    from krea2kit.recipe.trust import portable_recipe, untrusted_recipe

    data = {"references": [{"image": "/home/me/secret/ref.png", "strength": 2.0, "mode": "attention",
                            "frame": 3, "name": "sky"}]}
    kept, dropped = untrusted_recipe(data)
    assert kept["references"] == [{"strength": 2.0, "mode": "attention", "frame": 3, "name": "sky"}]
    assert dropped == ["references.0.image"]
    assert portable_recipe(data)["references"][0]["image"] == "ref.png"


def test_the_memory_preflight_counts_reference_tokens(cli_inproc, tmp_path, pictures):
    (tmp_path / "r.toml").write_text(RECIPE)

    def activations(*sets: str) -> int:
        res = cli_inproc("run", "r.toml", "-q", "--dry-run", "--json", "--set", "model.device=cpu",
                         *[a for s in sets for a in ("--set", s)])
        assert res.code == 0, res.stderr
        return json.loads(res.stdout.splitlines()[0])["memory"]["parts"]["transformer activations"]

    plain = activations()
    assert activations(refs(one("blue.png", 0.0))) == plain  # left out: costs nothing
    one_ref = activations(refs(one("blue.png", 1.0)))
    assert plain < one_ref < activations(refs(one("blue.png", 1.0), one("yellow.png", 1.0)))
    assert activations(refs(one("blue.png", 1.0, "attention"))) > one_ref  # + the pairwise mask
