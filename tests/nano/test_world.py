"""The nano synthetic world: determinism, held-out rule, geometry, captions."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from nanodev import world
from nanodev.world import (BACKGROUNDS, COLOURS, HELDOUT_PAIRS, SHAPES, Scene, SceneObject, caption,
                                 dataset, render, sample_scene)


def test_dataset_is_deterministic_and_item_independent_of_n():
    a = list(dataset(3, 6, "train"))
    b = list(dataset(3, 6, "train"))
    c = list(dataset(3, 3, "train"))
    for (ia, ca, sa), (ib, cb, sb) in zip(a, b):
        assert ia.tobytes() == ib.tobytes() and ca == cb and sa == sb
    for (ia, ca, sa), (ic, cc, sc) in zip(a, c):
        assert ia.tobytes() == ic.tobytes() and ca == cc and sa == sc
    d = list(dataset(4, 6, "train"))
    assert [s for _, _, s in a] != [s for _, _, s in d]  # the seed matters
    assert a[0][0].size == (64, 64) and a[0][0].mode == "RGB"


def test_train_never_produces_heldout_pairs_and_heldout_always_does():
    rng = np.random.default_rng(0)
    seen = Counter()
    for _ in range(4000):
        scene = sample_scene(rng, "train")
        for o in scene.objects:
            assert (o.colour, o.shape) not in HELDOUT_PAIRS, o
            seen[(o.colour, o.shape)] += 1
        assert scene.split == "train"
    # every other pair, hence every colour and every shape, is seen in training
    assert set(seen) == {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT_PAIRS
    held = Counter()
    for _ in range(1000):
        scene = sample_scene(rng, "heldout")
        assert scene.split == "heldout"
        held.update((o.colour, o.shape) for o in scene.objects if (o.colour, o.shape) in HELDOUT_PAIRS)
    assert set(held) == set(HELDOUT_PAIRS)
    with pytest.raises(ValueError):
        sample_scene(rng, "test")


def test_heldout_rule_is_one_colour_per_shape():
    assert len(HELDOUT_PAIRS) == len(SHAPES)
    assert {s for _, s in HELDOUT_PAIRS} == set(SHAPES)
    assert len({c for c, _ in HELDOUT_PAIRS}) == len(HELDOUT_PAIRS)


def test_scene_statistics():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(2000)]
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.background_style for s in scenes} == set(world.BACKGROUND_STYLES)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    assert {(o.row, o.col) for s in scenes for o in s.objects} == {(r, c) for r in range(3) for c in range(3)}
    repeated = sum(len(s.objects) != len({(o.colour, o.shape) for o in s.objects}) for s in scenes)
    assert repeated > 100  # repeats exist, so counts appear in captions
    for s in scenes:
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)  # one object per cell


def test_objects_never_overlap_touch_or_leave_the_image():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = sample_scene(rng, "train" if rng.random() < 0.5 else "heldout")
        masks = [world._shape_mask(o, 64) > 0 for o in scene.objects]
        for m, o in zip(masks, scene.objects):
            assert m.any()
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), o
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                yi, xi = np.nonzero(masks[i])
                yj, xj = np.nonzero(masks[j])
                gap = max(xj.min() - xi.max(), xi.min() - xj.max(), yj.min() - yi.max(), yi.min() - yj.max()) - 1
                assert gap >= 2, (scene, gap)


def test_render_is_antialiased_and_scales():
    obj = SceneObject("circle", "red", "large", 1, 1)
    scene = Scene((obj,), background="black")
    arr = np.asarray(render(scene), np.int32)
    bg, red = np.array(BACKGROUNDS["black"]), np.array(COLOURS["red"])
    pure = (np.abs(arr - bg).sum(-1) == 0) | (np.abs(arr - red).sum(-1) == 0)
    assert (~pure).sum() > 20  # blended edge pixels
    assert (arr[32, 32] == red).all() and (arr[0, 0] == bg).all()
    big = np.asarray(render(scene, 128), np.float32)
    small = big.reshape(64, 2, 64, 2, 3).mean((1, 3))
    assert np.abs(small - arr).max() < 40 and np.abs(small - arr).mean() < 1.0


def test_each_shape_has_its_expected_coverage():
    # Areas in pixels at 64 px against the analytic figures of each shape (side 16).
    s = 16.0
    expected = {"square": s * s, "circle": np.pi * s * s / 4, "ring": np.pi * s * s / 4 * (1 - world.RING_HOLE ** 2),
                "triangle": s * s / 2, "cross": s * s * (1 - (1 - 2 * 0.5 * world.CROSS_ARM) ** 2)}
    for shape, want in expected.items():
        got = world._shape_mask(SceneObject(shape, "red", "large", 1, 1), 64).sum()
        assert abs(got - want) / want < 0.08, (shape, got, want)


WORDS = re.compile(r"[a-z]+")


def test_captions_use_a_small_vocabulary_and_counts():
    vocab = set()
    corpus = world.caption_corpus(0, 2000)
    assert len(corpus) == 2000 and len(set(corpus)) > 1000
    for text in corpus:
        vocab.update(WORDS.findall(text))
    assert len(vocab) < 60, sorted(vocab)
    assert {"two", "three", "background", "left", "corner"} <= vocab
    # identical shape+colour objects are counted, never listed twice
    scene = Scene((SceneObject("triangle", "green", "small", 0, 0), SceneObject("triangle", "green", "small", 2, 2)))
    for k in range(20):
        text = caption(scene, np.random.default_rng(k))
        assert "two green triangles" in text or "two small green triangles" in text, text
    scene3 = Scene(tuple(SceneObject("cross", "blue", "large", 0, c) for c in range(3)))
    assert "three" in caption(scene3, np.random.default_rng(0))


def test_caption_mentions_every_object():
    for _, text, scene in dataset(5, 200, "heldout"):
        for o in scene.objects:
            assert o.colour in text and (o.shape in text or world.PLURALS[o.shape] in text), (text, scene)


def test_describe_is_complete():
    scene = Scene((SceneObject("ring", "yellow", "small", 0, 1),
                   SceneObject("square", "blue", "large", 1, 0)), background="white")
    assert world.describe(scene) == ("a small yellow ring at the top and a large blue square on the left, "
                                     "white background")
    assert replace(scene, background="gray").split == "heldout"
