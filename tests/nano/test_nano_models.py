"""The shipped nano models, end to end through the real CLI.

Images are rendered by ``krea2kit run`` in a subprocess from recipes written here, read back
from the PNG files and scored by the programmatic scorer against their captions. Captions are
the first held-out captions of :func:`nanodev.evaluate.heldout_captions` (every one names
a colour-shape pair the models never saw in training).

Thresholds come from the measurements in ``src/krea2kit/nano/weights/MODEL_CARD.md`` (CPU, fp32): they sit a few points under what the shipped weights score on exactly these images,
so a broken template, schedule, shift, noise draw, VAE scaling or weight file fails them (the
untrained placeholder scored 0.29 on such captions, which is the level of pure noise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanodev import scorer
from nanodev.evaluate import heldout_captions, recipe_text

pytestmark = pytest.mark.slow

# Number of held-out captions per CLI run (128x128 images: about 0.2 s each once loaded).
COUNT = 24
# Mean adherence floors, about 5 points under what the shipped (v2, 128x128) weights score on
# exactly these renders (measured: Turbo 0.859, Raw 0.869 on the 24 captions; quickstart 1.00
# over its 5 images). v1 scored 0.674 / 0.678 / 0.76 here.
TURBO_MIN_ADHERENCE = 0.81
RAW_MIN_ADHERENCE = 0.82
QUICKSTART_MIN_ADHERENCE = 0.90
# Shapes are drawn, not guessed: the shape check passes at least this often (measured 0.756 on
# Turbo, 0.78 on Raw; chance is 0.2, v1 scored 0.2-0.25).
MIN_SHAPE = 0.65
# Guidance on nano Raw must raise the shape check's pass rate by this much over guidance 0
# (measured 0.78 vs 0.61; v1's guidance bought colour instead).
GUIDANCE_SHAPE_GAIN = 0.10


def render(cli, tmp_path: Path, name: str, captions, **sampler) -> list[Path]:
    preset = sampler.pop("preset", "krea2-nano-turbo")
    seed = sampler.pop("seed", 0)
    out = tmp_path / name
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(recipe_text(captions, preset=preset, out_dir=out, seed=seed, **sampler))
    res = cli("run", str(recipe), "--json", "-q")
    assert res.code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [r["status"] for r in records] == ["ok"] * len(captions)
    return [Path(r["path"]) for r in records]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def summary(paths, captions) -> dict[str, float]:
    return scorer.summarise(scorer.score(pixels(p), c) for p, c in zip(paths, captions))


def test_turbo_follows_heldout_captions(cli, tmp_path):
    captions = heldout_captions(COUNT)
    paths = render(cli, tmp_path, "turbo", captions)
    result = summary(paths, captions)
    assert result["mean_adherence"] >= TURBO_MIN_ADHERENCE and result["shape"] >= MIN_SHAPE, result


def test_raw_follows_heldout_captions_and_guidance_helps(cli, tmp_path):
    captions = heldout_captions(COUNT)
    guided = summary(render(cli, tmp_path, "raw", captions, preset="krea2-nano-raw"), captions)
    unguided = summary(render(cli, tmp_path, "raw-g0", captions, preset="krea2-nano-raw", guidance=0.0), captions)
    assert guided["mean_adherence"] >= RAW_MIN_ADHERENCE and guided["shape"] >= MIN_SHAPE, guided
    assert guided["mean_adherence"] > unguided["mean_adherence"]
    # Guidance mostly buys shapes (measured on these captions: 0.78 vs 0.61).
    assert guided["shape"] >= unguided["shape"] + GUIDANCE_SHAPE_GAIN, (guided, unguided)


def test_same_seed_same_pixels_other_seed_other_image(cli, tmp_path):
    captions = heldout_captions(3)
    first = render(cli, tmp_path, "a", captions)
    again = render(cli, tmp_path, "b", captions)
    other = render(cli, tmp_path, "c", captions, seed=100)
    for p, q, r in zip(first, again, other):
        assert np.array_equal(pixels(p), pixels(q))
        assert np.abs(pixels(p).astype(int) - pixels(r).astype(int)).mean() > 2.0


def test_shift_changes_the_image(cli, tmp_path):
    captions = heldout_captions(3)
    default = render(cli, tmp_path, "mu-default", captions)          # Turbo preset: mu 1.15
    shifted = render(cli, tmp_path, "mu-low", captions, mu=-1.0)      # most steps at low noise
    # Visibly: pixels that move by more than 16 levels (measured 1840, 1474 and 1558 of 16384).
    changed = [int((np.abs(pixels(p).astype(int) - pixels(q).astype(int)).max(-1) > 16).sum())
               for p, q in zip(default, shifted)]
    assert min(changed) >= 200, changed


def test_quickstart_recipe_matches_its_prompts(cli, tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"
    res = cli("run", str(recipe), "--json", "-q", "--set", f'output.dir="{tmp_path / "qs"}"')
    assert res.code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert records and all(r["status"] == "ok" for r in records)
    scores = [scorer.score(pixels(Path(r["path"])), r["prompt"]).adherence for r in records]
    assert np.mean(scores) >= QUICKSTART_MIN_ADHERENCE, scores
