"""Train on Raw, run on Turbo, on the embedded nano family (CPU, about two minutes in all).

1. A style LoRA trained on nano Raw from a small generated dataset (the nano world's scenes,
   every background drawn with the world's vertical gradient, which plain scenes show a third
   of the time and captions never name), applied on nano Turbo: a programmatic style score
   (how much lighter the background's bottom is than its top) rises clearly while prompt
   adherence (``nanodev.scorer``) stays within 5 points.
2. A size slider trained on nano Raw through ``krea2kit train`` (Concept Sliders): the mean
   object area on nano Turbo, rendered by ``krea2kit run --sweep``, grows monotonically from
   slider value -1 to 1.
3. Which Turbo strength reproduces the Raw-trained LoRA's effect on Raw (printed; the README
   states the measured value).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

world = pytest.importorskip("nanodev.world")
scorer = pytest.importorskip("nanodev.scorer")

STYLE_STEPS = 400
STYLE_IMAGES = 256
TURBO_STRENGTHS = (1.0, 1.25, 1.5, 1.75, 2.0)
EVAL_PROMPTS = 24
SLIDER_VALUES = (-1.0, -0.5, 0.0, 0.5, 1.0)
# The nano models' size (v2 draws at 128x128; a LoRA trained at 64 bends the 128 px model).
SIZE = 128


@pytest.fixture(scope="module")
def session(tmp_path_factory, one_thread):
    from krea2kit.api import Session
    from krea2kit.settings import CacheSettings, Settings

    cache = tmp_path_factory.mktemp("demo-cache")
    return Session(settings=Settings(cache=CacheSettings(dir=str(cache))))


def style_score(image) -> float:
    """Background luminance of the bottom 16 rows minus the top 16 (neutral pixels only: the
    world's objects are saturated colours); NaN when either band is mostly objects."""
    a = np.asarray(image.convert("RGB"), np.float32)
    background = (a.max(-1) - a.min(-1)) < 30
    lum = a.mean(-1)
    top, bottom = lum[:16][background[:16]], lum[-16:][background[-16:]]
    if top.size < 64 or bottom.size < 64:
        return float("nan")
    return float(np.median(bottom) - np.median(top))


def _eval_captions(n: int = EVAL_PROMPTS) -> list[str]:
    out = []
    for i in range(n):  # scenes the LoRA never saw (another world seed)
        rng = world.item_rng(99, "train", i)
        scene = world.sample_scene(rng)
        out.append(world.caption(scene, rng))
    return out


def _render(session, preset: str, captions, out: Path, lora: Path | None = None, strength: float = 1.0):
    from PIL import Image

    from krea2kit.recipe.loader import LoadedRecipe

    data = {"prompts": [{"text": c, "name": f"{i:02d}"} for i, c in enumerate(captions)], "seed": 3,
            "model": {"preset": preset}, "output": {"dir": str(out), "name": "{name}", "overwrite": True}}
    if lora is not None:
        data["loras"] = [{"path": str(lora), "strength": float(strength), "name": "style"}]
    plan = session.plan(LoadedRecipe(data=data, provenance={}, path="<demo>", name="demo"))
    images = []
    for record in session.run(plan):
        assert record.status == "ok", record.blocked_by
        with Image.open(record.path) as im:
            images.append(im.convert("RGB"))
    return images


def _measure(images, captions) -> tuple[float, float]:
    style = float(np.nanmean([style_score(im) for im in images]))
    adherence = float(np.mean([scorer.score(im, c).adherence for im, c in zip(images, captions)]))
    return style, adherence


@pytest.fixture(scope="module")
def style_run(tmp_path_factory, session):
    """The style dataset, the LoRA trained on nano Raw, and the measurements."""
    from krea2kit.train.loop import Trainer
    from krea2kit.train.schema import TrainRecipe

    tmp = tmp_path_factory.mktemp("style")
    data = tmp / "data"
    data.mkdir()
    for i in range(STYLE_IMAGES):
        rng = world.item_rng(7, "train", i)
        scene = world.sample_scene(rng)
        world.render(replace(scene, background_style="gradient"), SIZE).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(world.caption(scene, rng))
    recipe = TrainRecipe.model_validate({
        "name": "nano-gradient", "steps": STYLE_STEPS, "checkpoint_every": STYLE_STEPS, "seed": 0, "batch_size": 4,
        "caption_dropout": 0.1, "base": {"preset": "krea2-nano-raw"},
        "dataset": {"path": str(data), "resolution": SIZE},
        # the main blocks only: adapters on the text fusion learn the style too, but bend prompt
        # adherence with it (measured: 2 to 8 points lower after 150 steps with every Linear)
        "adapter": {"rank": 8, "alpha": 8, "targets": ["blocks"]},
        "optimizer": {"lr": 2e-3}, "output": {"path": str(tmp / "style.safetensors"), "dtype": "float32"}})
    trainer = Trainer(recipe, session=session)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    captions = _eval_captions()
    m: dict[tuple[str, float], tuple[float, float]] = {}
    m[("turbo", 0.0)] = _measure(_render(session, "krea2-nano-turbo", captions, tmp / "t0"), captions)
    for s in TURBO_STRENGTHS:
        m[("turbo", s)] = _measure(_render(session, "krea2-nano-turbo", captions, tmp / f"t{s}", result.path, s),
                                   captions)
    m[("raw", 0.0)] = _measure(_render(session, "krea2-nano-raw", captions, tmp / "r0"), captions)
    m[("raw", 1.0)] = _measure(_render(session, "krea2-nano-raw", captions, tmp / "r1", result.path, 1.0), captions)
    data_style = float(np.nanmean([style_score(p) for p in _open_all(data)]))
    print(f"\nstyle LoRA: {STYLE_STEPS} steps at {result.steps_per_s:.2f} steps/s; dataset style {data_style:.1f}")
    for (model, s), (style, adherence) in m.items():
        print(f"  {model:<5} strength {s:<3g} style {style:6.2f} adherence {adherence:.3f}")
    return m


def _open_all(folder: Path):
    from PIL import Image

    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            yield im.convert("RGB")


def _matching_strength(m) -> float:
    raw_effect = m[("raw", 1.0)][0] - m[("raw", 0.0)][0]
    return min(TURBO_STRENGTHS, key=lambda s: abs(m[("turbo", s)][0] - m[("turbo", 0.0)][0] - raw_effect))


def test_style_lora_trained_on_raw_shows_on_turbo(style_run):
    m = style_run
    base_style, base_adherence = m[("turbo", 0.0)]
    style, adherence = m[("turbo", 1.0)]
    # the background gradient: about 4 levels without the LoRA (a third of the world's scenes
    # have a faint one), 18 in the dataset; measured on Turbo (nano v2, 128x128): 10.2 at
    # strength 1 with adherence 0.883 against 0.893 without. Higher strengths push the style
    # further (13.1 at 2) but cost shapes (adherence 0.80 at 2): not asserted, printed.
    assert style - base_style > 4.0, m
    assert abs(adherence - base_adherence) <= 0.05, m
    raw_effect = m[("raw", 1.0)][0] - m[("raw", 0.0)][0]
    assert raw_effect > 4.0, m  # it learned the style on the model it was trained on
    assert abs(m[("raw", 1.0)][1] - m[("raw", 0.0)][1]) <= 0.05, m


def test_turbo_strength_that_reproduces_the_raw_effect(style_run):
    """Measured, not a rule: the strength whose Turbo effect is nearest the Raw effect."""
    m = style_run
    s = _matching_strength(m)
    raw_effect = m[("raw", 1.0)][0] - m[("raw", 0.0)][0]
    effects = [m[("turbo", t)][0] - m[("turbo", 0.0)][0] for t in TURBO_STRENGTHS]
    # where the Turbo effect crosses the Raw effect, linearly between the measured strengths
    crossing = next((a + (raw_effect - ea) / (eb - ea) * (b - a)
                     for (a, ea), (b, eb) in zip(zip(TURBO_STRENGTHS, effects), zip(TURBO_STRENGTHS[1:], effects[1:]))
                     if ea <= raw_effect <= eb and eb > ea), None)
    print(f"\nTurbo strength nearest the Raw-trained LoRA's effect on Raw (+{raw_effect:.2f}): {s:g}; "
          f"Turbo effects {dict(zip(TURBO_STRENGTHS, [round(e, 2) for e in effects]))}; crossing at "
          f"{'none' if crossing is None else f'{crossing:.2f}'}")
    assert s in TURBO_STRENGTHS
    # on Turbo the effect grows with the strength (measured: +7.0 at 1, +8.5 at 1.5, +11.2 at 2,
    # against +8.9 on Raw at 1)
    assert effects[0] < effects[-1], m


def _object_area(image) -> float:
    """Pixel area of the main object: the largest component the scorer recognises as a shape
    (a blob it cannot name, e.g. two objects run together, does not count); NaN if none."""
    _bg, _rgb, detections = scorer.detect(image)
    areas = [d.area for d in detections if d.shape != "unknown"]
    return float(max(areas)) if areas else float("nan")


def test_size_slider_is_monotonic_on_turbo(tmp_path, session, cli_inproc):
    from PIL import Image

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "train-slider-nano.toml"
    shutil.copy(recipe, tmp_path / "slider.toml")
    res = cli_inproc("train", "slider.toml", "--set", 'output.path="loras/nano-size.safetensors"',
                     "--set", "steps=80")
    assert res.code == 0, res.stderr
    slider_recipe = tmp_path / "loras" / "nano-size.slider.toml"
    assert slider_recipe.is_file(), res.stderr
    prompts = ["a red circle in the center", "a blue circle on the left", "a green circle at the top",
               "a yellow circle at the bottom right, gray background", "a red square in the center",
               "a blue triangle on the right", "a purple circle on the right, white background",
               "a green circle on the right"]
    args = ["run", str(slider_recipe), "--sweep", "nano-size=-1:1:5"]
    for p in prompts:
        args += ["--prompt", p]
    res = cli_inproc(*args)
    assert res.code == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.endswith(".png")]
    sheet = [line for line in lines if "-sweep-" in line]
    images = [line for line in lines if "-sweep-" not in line]
    assert len(sheet) == 1 and len(images) == len(prompts) * len(SLIDER_VALUES)
    table = np.zeros((len(SLIDER_VALUES), len(prompts)))
    for i, path in enumerate(images):  # the sweep renders one column (slider value) after another
        with Image.open(tmp_path / path if not Path(path).is_absolute() else path) as im:
            table[i // len(prompts), i % len(prompts)] = _object_area(im.convert("RGB"))
    complete = ~np.isnan(table).any(axis=0)  # prompts whose object is read at every value
    assert complete.sum() >= len(prompts) - 2, table
    areas = [float(a) for a in table[:, complete].mean(axis=1)]
    print("\nsize slider: mean object area (pixels) at", dict(zip(SLIDER_VALUES, [round(a, 1) for a in areas])))
    assert all(b > a for a, b in zip(areas, areas[1:])), areas
    assert areas[-1] - areas[0] > 0.05 * areas[2], areas
