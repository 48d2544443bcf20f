"""The nano synthetic world: a deterministic generator of scenes and their captions.

Geometry is defined at 64x64 and drawn at any size (``render(scene, size)``). The v1 nano models
drew it at 64 (f8 VAE -> 8x8x16 latents -> 16 image tokens); v2 draws it at 128 (16x16x16
latents, 64 tokens, objects of 20 and 32 px). The models are trained and evaluated on this
world; :mod:`nanodev.scorer` reads generated images back and checks them against a scene
or a caption. Only numpy and Pillow are used (no torch at import).

Vocabulary
----------
* shapes (5): ``circle``, ``square``, ``triangle`` (apex up), ``ring`` (a disc with a hole of half
  its diameter), ``cross`` (a plus sign, arms 0.36 of its size). They were chosen so that simple
  mask features separate them at 64x64: hole -> ring; bounding-box fill ~1 -> square; mass in the
  top half ~1/3 of the bottom half -> triangle; fill ~0.79 -> circle against ~0.59 -> cross.
* colours (7), RGB: red (220, 40, 40), orange (245, 140, 20), yellow (240, 220, 40),
  green (40, 170, 60), cyan (40, 200, 210), blue (40, 80, 225), purple (150, 60, 200).
  They are >= 82 apart from each other in RGB (>= 29 in CIE Lab, blue-purple the closest) and
  >= 101 from every background colour.
* sizes (2): ``small`` (10 px across at 64x64) and ``large`` (16 px).
* positions (9): a 3x3 grid, rows ``top/middle/bottom`` x columns ``left/center/right``; an
  object sits in its cell (small ones jittered by up to 3 px, large ones by 1 px) and at most one
  object occupies a cell, so objects never overlap or touch (gap >= 3.3 px in geometry, >= 2 clean
  pixels after anti-aliasing; tested).
* backgrounds (3): ``black`` (22, 22, 26), ``gray`` (128, 128, 128), ``white`` (236, 236, 232),
  each ``plain``, with a subtle vertical ``gradient`` (+-10) or faint ``noise`` (sigma 3); the
  texture is never named in captions.
* 1 to 3 objects per scene; with probability 0.3 a scene with several objects repeats one
  shape+colour, so counts ("two", "three") occur.

Caption grammar
---------------
::

    caption   := [prefix] group ("," group)* [" and " group] [background]
    group     := count [size] colour shape[s] [positions]
    count     := "a" | "an" | "one" | "two" | "three"
    positions := place (" and " place)*           # one place per object of the group
    place     := "at the top" | "at the top left" | "in the top left corner" | "on the left"
               | "in the center" | "in the middle" | "at the bottom right" | ...
    prefix    := "" | "a picture of " | "an image of " | "a drawing of "
    background:= ", " bg " background" | " on a " bg " background"

Per caption the generator decides whether it names sizes (p=0.5), places (p=0.8) and the
background (p=0.6); objects that share shape+colour (and size when sizes are named) are grouped
with a count word. Examples: ``"a red circle on the left and a blue square on the right, gray
background"``, ``"two green triangles"``, ``"a small yellow cross at the top"``.
:func:`nanodev.scorer.parse_caption` reads this grammar (and looser user text) back.

Held-out rule
-------------
Five colour-shape pairs, one per shape and each with a different colour, never appear in the
training split: **purple triangle, orange circle, cyan square, yellow ring, green cross**
(:data:`HELDOUT_PAIRS`). ``split="train"`` never produces them (rejection sampling per object);
``split="heldout"`` scenes contain at least one of them (their other objects are drawn freely).
Every colour and every shape is still seen in training, only these combinations are new.

Determinism
-----------
``dataset(seed, n, split)`` gives item ``i`` its own generator seeded with ``(seed, split, i)``,
so an item does not depend on ``n`` and the same arguments always yield identical pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "ring", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "ring": "rings", "cross": "crosses"}
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 225),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (22, 22, 26), "gray": (128, 128, 128), "white": (236, 236, 232)}
BACKGROUND_STYLES = ("plain", "gradient", "noise")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SPLITS = ("train", "heldout")

HELDOUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "circle"), ("cyan", "square"),
                           ("yellow", "ring"), ("green", "cross")})

# Geometry at the 64 px reference size (scaled for other sizes).
REFERENCE_SIZE = 64
OBJECT_PIXELS = {"small": 10.0, "large": 16.0}  # bounding-box side of each size
JITTER_PIXELS = {"small": 3.0, "large": 1.0}    # max centre offset inside the cell; keeps gaps >= 3 px
RING_HOLE = 0.5       # inner diameter / outer diameter: the hole survives at 10 px
CROSS_ARM = 0.36      # arm thickness / size: fill 0.59, far from the circle's 0.79
SUPERSAMPLE = 4       # render at 4x, box-downsample: anti-aliased edges
COLOUR_JITTER = 8     # per-channel tint of each object, uniform in [-8, 8]
BACKGROUND_JITTER = 6
GRADIENT_AMPLITUDE = 10.0
NOISE_SIGMA = 3.0
OBJECT_COUNT_WEIGHTS = (0.3, 0.4, 0.3)  # 1, 2, 3 objects
REPEAT_PROBABILITY = 0.3                 # several objects share one shape+colour


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int  # 0 top, 1 middle, 2 bottom
    col: int  # 0 left, 1 center, 2 right
    dx: float = 0.0  # centre offset in pixels at 64 px, inside the cell
    dy: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[self.colour], self.tint))


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "gray"
    background_style: str = "plain"
    background_tint: tuple[int, int, int] = (0, 0, 0)
    noise_seed: int = 0

    @property
    def split(self) -> str:
        """"heldout" when any object is a held-out colour-shape pair."""
        return "heldout" if any((o.colour, o.shape) in HELDOUT_PAIRS for o in self.objects) else "train"


def position_name(row: int, col: int) -> str:
    """Canonical name of a grid cell: "top left", "top", "left", "center", "bottom right", ..."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def _is_heldout(colour: str, shape: str) -> bool:
    return (colour, shape) in HELDOUT_PAIRS


def _draw_pair(rng: np.random.Generator, split: str) -> tuple[str, str]:
    while True:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        if split == "train" and _is_heldout(colour, shape):
            continue
        return colour, shape


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene. ``split="train"`` never contains a :data:`HELDOUT_PAIRS` pair;
    ``split="heldout"`` always contains at least one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_WEIGHTS))
    cells = rng.permutation(9)[:n]
    pairs = [_draw_pair(rng, split) for _ in range(n)]
    if n > 1 and rng.random() < REPEAT_PROBABILITY:
        k = int(rng.integers(2, n + 1))  # how many share the first pair
        pairs[1:k] = [pairs[0]] * (k - 1)
    if split == "heldout" and not any(_is_heldout(c, s) for c, s in pairs):
        held = sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))]
        i = int(rng.integers(n))
        old = pairs[i]
        pairs = [held if p == old else p for p in pairs]  # keep repeated groups repeated
    objects = []
    for (colour, shape), cell in zip(pairs, cells):
        size = str(rng.choice(SIZES))
        j = JITTER_PIXELS[size]
        objects.append(SceneObject(
            shape=shape, colour=colour, size=size, row=int(cell) // 3, col=int(cell) % 3,
            dx=float(rng.uniform(-j, j)), dy=float(rng.uniform(-j, j)),
            tint=tuple(int(t) for t in rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3))))
    objects.sort(key=lambda o: (o.row, o.col))
    return Scene(objects=tuple(objects), background=str(rng.choice(list(BACKGROUNDS))),
                 background_style=str(rng.choice(BACKGROUND_STYLES)),
                 background_tint=tuple(int(t) for t in rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, 3)),
                 noise_seed=int(rng.integers(2**31)))


# ----------------------------------------------------------------------------- rendering

def _shape_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Coverage in [0, 1] of one object on a ``size`` x ``size`` canvas (4x supersampled)."""
    big = size * SUPERSAMPLE
    scale = big / REFERENCE_SIZE
    cell = big / 3
    cx = (obj.col + 0.5) * cell + obj.dx * scale
    cy = (obj.row + 0.5) * cell + obj.dy * scale
    h = OBJECT_PIXELS[obj.size] * scale / 2
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    # PIL boxes are inclusive of both corners: subtract one pixel so the side is 2h exactly.
    x0, y0, x1, y1 = cx - h, cy - h, cx + h - 1, cy + h - 1
    if obj.shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "ring":
        d.ellipse((x0, y0, x1, y1), fill=255)
        r = h * RING_HOLE
        d.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=0)
    elif obj.shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=255)
    elif obj.shape == "triangle":
        d.polygon([(cx - 0.5, y0), (x1, y1), (x0, y1)], fill=255)
    elif obj.shape == "cross":
        a = h * CROSS_ARM
        d.rectangle((cx - a, y0, cx + a - 1, y1), fill=255)
        d.rectangle((x0, cy - a, x1, cy + a - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    small = img.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_background(scene: Scene, size: int = REFERENCE_SIZE) -> np.ndarray:
    """The background as float32 HxWx3 in [0, 255]."""
    base = np.array(BACKGROUNDS[scene.background], np.float32) + np.array(scene.background_tint, np.float32)
    bg = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.background_style == "gradient":
        ramp = np.linspace(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE, size, dtype=np.float32)
        bg += ramp[:, None, None]
    elif scene.background_style == "noise":
        bg += np.random.default_rng(scene.noise_seed).normal(0, NOISE_SIGMA, (size, size, 1)).astype(np.float32)
    return bg


def render(scene: Scene, size: int = REFERENCE_SIZE) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size`` x ``size`` pixels (anti-aliased)."""
    out = render_background(scene, size)
    for obj in scene.objects:
        a = _shape_mask(obj, size)[..., None]
        out = out * (1 - a) + np.array(obj.rgb, np.float32) * a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions

COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ")
# Phrasings of each place; the scorer's parser reads the row/column words, not the preposition.
PLACE_PHRASES = {
    "center": ("in the center", "in the middle"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "left": ("on the left",),
    "right": ("on the right",),
}
for _r in ("top", "bottom"):
    for _c in ("left", "right"):
        PLACE_PHRASES[f"{_r} {_c}"] = (f"at the {_r} {_c}", f"in the {_r} {_c} corner")
BACKGROUND_PHRASES = (", {} background", " on a {} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene`` from the grammar in the module docstring (random paraphrase)."""
    say_size = rng.random() < 0.5
    say_place = rng.random() < 0.8
    say_background = rng.random() < 0.6
    groups: dict[tuple, list[SceneObject]] = {}
    for obj in scene.objects:
        key = (obj.colour, obj.shape, obj.size if say_size else None)
        groups.setdefault(key, []).append(obj)
    phrases = []
    for (colour, shape, size), objs in groups.items():
        adjectives = f"{size} {colour}" if size else colour
        count = COUNT_WORDS[len(objs)]
        if count == "a":
            count = _article(adjectives) if rng.random() < 0.85 else "one"
        noun = shape if len(objs) == 1 else PLURALS[shape]
        text = f"{count} {adjectives} {noun}"
        if say_place:
            places = [str(rng.choice(PLACE_PHRASES[o.position])) for o in objs]
            text += " " + " and ".join(places)
        phrases.append(text)
    order = rng.permutation(len(phrases))
    phrases = [phrases[i] for i in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = str(rng.choice(PREFIXES)) + body
    if say_background:
        text += str(rng.choice(BACKGROUND_PHRASES)).format(scene.background)
    return text


def describe(scene: Scene) -> str:
    """A canonical, complete caption (every size, place and the background): for logs and tests."""
    parts = []
    for o in scene.objects:
        adjectives = f"{o.size} {o.colour}"
        parts.append(f"{_article(adjectives)} {adjectives} {o.shape} {PLACE_PHRASES[o.position][0]}")
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body}, {scene.background} background"


# ----------------------------------------------------------------------------- dataset

def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def dataset(seed: int, n: int, split: str = "train", size: int = REFERENCE_SIZE
            ) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Yield ``n`` (image, caption, scene) triples; item ``i`` depends only on (seed, split, i)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for i in range(n):
        rng = item_rng(seed, split, i)
        scene = sample_scene(rng, split)
        yield render(scene, size), caption(scene, rng), scene


def caption_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Captions of both splits (no rendering), e.g. to train the nano tokenizer's merges."""
    out = []
    for split in SPLITS:
        for i in range(n // 2):
            rng = item_rng(seed, split, i)
            out.append(caption(sample_scene(rng, split), rng))
    return out


__all__ = [
    "BACKGROUNDS", "BACKGROUND_STYLES", "COLOURS", "COLS", "HELDOUT_PAIRS", "PLURALS", "ROWS", "SHAPES", "SIZES",
    "SPLITS", "Scene", "SceneObject", "caption", "caption_corpus", "dataset", "describe", "item_rng",
    "position_name", "render", "render_background", "sample_scene",
]
