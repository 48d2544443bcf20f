"""Programmatic prompt-adherence scorer for the nano world (:mod:`nanodev.world`).

``score(image, target)`` reads an image (any size; it is box-resized to 64x64) and checks it
against a :class:`~nanodev.world.Scene`, a :class:`Spec` or a caption string. numpy only.

How an image is read
--------------------
1. Background: the per-channel median of the 2-pixel border; its name is the nearest
   background of the world in CIE Lab.
2. Objects: pixels further than :data:`FOREGROUND_DISTANCE` (RGB) from the background, split into
   4-connected components (a small union-find over the 64x64 grid); components under
   :data:`MIN_AREA` pixels are noise and ignored.
3. Each component's colour is the median of its most saturated ("core") pixels, named by the
   nearest palette colour in CIE Lab, or ``"unknown"`` beyond :data:`MAX_COLOUR_DISTANCE`.
   Its mask is then refined to the pixels at least half covered by that colour (the coverage
   is the projection of pixel - background onto colour - background), which undoes the
   anti-aliasing and makes the geometry stable at small sizes.
4. Shape, from the coverage map (coverage-weighted, so sub-pixel placement does not matter):
   a hole in the refined mask or an empty centroid -> ring; fill of the soft bounding box
   >= 0.89 -> square; vertical mass skewness < -0.2 (apex up) -> triangle; fill >= 0.72 ->
   circle; else cross. Very elongated, sparse (fill < 0.35) or huge (side > 24 px, or over
   20 % of the image) components are ``"unknown"``.
5. Size: soft bounding-box side >= 12.5 px -> large (the world's sizes are 10 and 16 px);
   over 24 px -> ``"unknown"`` (no world object is that big: a blob, not an object).
   Position: the 3x3 grid cell of the coverage-weighted centroid.

Checks
------
Expected objects are matched to detections by the Hungarian algorithm on a mismatch cost
(colour and shape weigh 2, size and position 1). Then, per expected object: ``present``,
``colour``, ``shape``, and ``size`` / ``position`` when the target states them; per
(colour, shape) group: ``count`` (exactly that many such detections); once: ``no_extra``
(no more detections than expected objects) and ``background`` when stated. ``adherence`` is the
fraction of checks passed, ``strict`` is True when all pass.

Measured accuracy on ground truth
---------------------------------
Renders of ``world.dataset(seed, 500, split)`` for seeds 0-3 (2000 train + 2000 held-out images)
scored against their scenes (every attribute checked): mean adherence 1.000 and strict
all-correct 100.0 % on both splits; against their captions via ``parse_caption``, the same.
Degraded renders (600 images, strict rate): Gaussian blur 0.6 px + noise sigma 6: 100 %;
blur 1 px + noise 10: 99.5 % (mean 0.999); blur 1.5 px + noise 15: 63 % (mean 0.93: small rings
and crosses really lose their shape); a 32 px round trip: 99.8 %. Uniform-noise images score a
mean adherence of 0.22 against random scenes. About 2.7 ms per score on one CPU core.
``tests/nano/test_scorer.py`` pins >= 0.98 mean and >= 95 % strict on ground truth.

Caption parsing
---------------
:func:`parse_caption` reads the world's grammar and looser user text: count words (a, an, one,
two ... five, digits), sizes (small/little/tiny, large/big), colours (+ grey, violet, ...),
shapes (singular or plural), places after their noun (top/upper, bottom/lower, left, right,
center/centre/middle, combined as "top left"), and "<colour> background". Unstated attributes
are None and are not checked. Places follow the world's cells: "at the top" is the top-center cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Union

import numpy as np
from PIL import Image

from nanodev.world import BACKGROUNDS, COLOURS, REFERENCE_SIZE, SHAPES, Scene

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background; palette-background gaps are >= 101
MIN_AREA = 12               # pixels; the smallest world object (a 10 px triangle) covers ~50
BORDER = 2
COVERAGE_THRESHOLD = 0.5
MAX_COLOUR_DISTANCE = 45.0  # Lab; world tints move a colour by < 10
LARGE_MIN_SIDE = 12.5       # soft side: small renders measure 8.3-10.1 px, large 14.3-16.1
SQUARE_MIN_FILL = 0.89      # square 0.98-1.00 (0.94 blurred by 1 px), circle 0.76-0.81 (0.85 blurred)
CIRCLE_MIN_FILL = 0.72      # circle >= 0.76 (0.78 blurred); cross <= 0.63 (0.68 blurred)
TRIANGLE_MAX_SKEW = -0.2   # vertical mass skewness: triangle -0.62..-0.50 (-0.38 blurred), others +-0.12
MIN_CORE = 4                # interior pixels needed to take the colour from the interior
RING_MAX_CENTRE = 0.7       # coverage at the centroid: 0 in a ring (<= 0.68 blurred 1.5 px), 1 in others
MIN_HOLE = 2                # enclosed background pixels that make a ring (rings have 16-52)
MIN_ASPECT, MAX_ASPECT = 0.6, 1.67
MIN_FILL = 0.35
MAX_AREA_FRACTION = 0.2     # a "component" covering a fifth of the image is not an object
MAX_SIDE = 24.0             # 1.5 x the large size: bigger components are blobs, not objects
COST_WEIGHTS = {"colour": 2.0, "shape": 2.0, "size": 1.0, "position": 1.0}


# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class ObjectSpec:
    """One expected object; None means "not stated, not checked"."""
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    row: int | None = None
    col: int | None = None

    @property
    def has_position(self) -> bool:
        return self.row is not None and self.col is not None


@dataclass(frozen=True)
class Spec:
    objects: tuple[ObjectSpec, ...]
    background: str | None = None


def spec_from_scene(scene: Scene) -> Spec:
    return Spec(tuple(ObjectSpec(o.shape, o.colour, o.size, o.row, o.col) for o in scene.objects), scene.background)


COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "pair": 2, "three": 3, "four": 4, "five": 5,
               "1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
              "huge": "large"}
COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple", "turquoise": "cyan", "aqua": "cyan"}
BACKGROUND_WORDS = {b: b for b in BACKGROUNDS} | {"grey": "gray", "dark": "black", "light": "white"}
SHAPE_WORDS = {s: s for s in SHAPES} | {"circles": "circle", "squares": "square", "triangles": "triangle",
                                        "rings": "ring", "crosses": "cross", "disc": "circle", "discs": "circle",
                                        "dot": "circle", "dots": "circle", "plus": "cross", "donut": "ring",
                                        "donuts": "ring"}
PLURAL_SHAPE_WORDS = frozenset({"circles", "squares", "triangles", "rings", "crosses", "discs", "dots", "donuts"})
ROW_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2, "middle": 1, "center": 1, "centre": 1}
COL_WORDS = {"left": 0, "right": 2, "center": 1, "centre": 1, "middle": 1}


def _places(tokens: list[str]) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t in ROW_WORDS:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt in COL_WORDS:
                out.append((ROW_WORDS[t], COL_WORDS[nxt]))
                i += 2
                continue
            out.append((ROW_WORDS[t], 1))
        elif t in COL_WORDS:
            out.append((1, COL_WORDS[t]))
        i += 1
    return out


def parse_caption(text: str) -> Spec:
    """Read a caption (the world's grammar or similar user text) into a :class:`Spec`."""
    tokens = re.findall(r"[a-z]+|\d+", text.lower().replace("-", " "))
    background = None
    for i, t in enumerate(tokens):
        if t in ("background", "backdrop") and i > 0 and tokens[i - 1] in BACKGROUND_WORDS:
            background = BACKGROUND_WORDS[tokens[i - 1]]
            tokens[i - 1] = tokens[i] = ""  # the background's words are no object's
    nouns = [i for i, t in enumerate(tokens) if t in SHAPE_WORDS]
    objects: list[ObjectSpec] = []
    start = 0
    for k, ni in enumerate(nouns):
        end = nouns[k + 1] if k + 1 < len(nouns) else len(tokens)
        # Adjectives: between the previous noun's places and this noun (nearest words win).
        before = tokens[start:ni]
        colour = next((COLOUR_WORDS[t] for t in reversed(before) if t in COLOUR_WORDS), None)
        size = next((SIZE_WORDS[t] for t in reversed(before) if t in SIZE_WORDS), None)
        plural = tokens[ni] in PLURAL_SHAPE_WORDS
        count = next((COUNT_WORDS[t] for t in reversed(before) if t in COUNT_WORDS), None)
        if count is None or (plural and count == 1):  # "a picture of red circles": the "a" is not theirs
            count = 2 if plural else 1
        # Places: after this noun, up to the next object's first adjective.
        after = tokens[ni + 1:end]
        cut = next((j for j, t in enumerate(after) if t in COUNT_WORDS or t in SIZE_WORDS or t in COLOUR_WORDS),
                   len(after))
        places = _places(after[:cut])
        start = ni + 1 + cut
        if len(places) != count:
            places = [(None, None)] * count  # ambiguous ("two circles on the left"): not checked
        for row, col in places:
            objects.append(ObjectSpec(SHAPE_WORDS[tokens[ni]], colour, size, row, col))
    return Spec(tuple(objects), background)


# ----------------------------------------------------------------------------- colour

def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 255] (..., 3) -> CIE Lab (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES = list(COLOURS)
_PALETTE_LAB = _srgb_to_lab(np.array([COLOURS[c] for c in _PALETTE_NAMES]))
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_LAB = _srgb_to_lab(np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES]))


def name_colour(rgb) -> tuple[str, float]:
    """Nearest palette colour in Lab and its distance; "unknown" beyond MAX_COLOUR_DISTANCE."""
    d = np.linalg.norm(_PALETTE_LAB - _srgb_to_lab(np.asarray(rgb)), axis=-1)
    i = int(np.argmin(d))
    return (_PALETTE_NAMES[i] if d[i] <= MAX_COLOUR_DISTANCE else "unknown"), float(d[i])


# ----------------------------------------------------------------------------- detection

@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    area: int                      # refined-mask pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    centroid: tuple[float, float]  # x, y
    rgb: tuple[int, int, int]
    colour_distance: float         # Lab distance to the named palette colour
    features: dict = field(default_factory=dict, compare=False)


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels of a boolean mask (0 = background), by union-find with path halving."""
    h, w = mask.shape
    parent = np.arange(h * w)
    flat = mask.ravel()

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    idx = np.arange(h * w).reshape(h, w)
    pairs = [(idx[:, :-1][mask[:, :-1] & mask[:, 1:]], 1), (idx[:-1, :][mask[:-1, :] & mask[1:, :]], w)]
    for starts, step in pairs:
        for a in starts.tolist():
            ra, rb = find(a), find(a + step)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    labels = np.zeros(h * w, np.int64)
    roots = {}
    for p in np.flatnonzero(flat).tolist():
        r = find(p)
        labels[p] = roots.setdefault(r, len(roots) + 1)
    return labels.reshape(h, w)


def _has_hole(mask: np.ndarray) -> int:
    """Pixels of background enclosed by the mask (4-connected to nothing outside its box)."""
    free = np.pad(~mask, 1, constant_values=True)
    outside = np.zeros_like(free)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    outside &= free
    while True:  # grow from the frame through free pixels; boxes are tiny, this takes a few steps
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if (grown == outside).all():
            break
        outside = grown
    return int((free & ~outside).sum())


def classify_shape(coverage: np.ndarray) -> tuple[str, dict]:
    """Shape name of one object's coverage map (floats in [0, 1], zero off the object).

    Features are coverage-weighted so that sub-pixel placement does not move them: extents are
    sums of the per-column / per-row maximum coverage, fill is total coverage over the box,
    the vertical skewness of the mass is about -0.57 for an apex-up triangle, 0 otherwise, and the
    coverage at the centroid is ~0 for a ring only. Thresholds were set from the feature ranges
    of 2000 renders, clean and blurred (Gaussian 1 px); "blurred" figures below are those.
    """
    cov = np.clip(coverage, 0.0, 1.0)
    area = float(cov.sum())
    # Extents from the coverage smoothed across the measured axis ([1, 2, 1] / 4): the maximum of
    # noisy values is biased upwards, smoothing first keeps pixel noise out of the extents.
    p = np.pad(cov, 1)
    along_y = (p[:-2, 1:-1] + 2 * p[1:-1, 1:-1] + p[2:, 1:-1]) / 4
    along_x = (p[1:-1, :-2] + 2 * p[1:-1, 1:-1] + p[1:-1, 2:]) / 4
    w = float(along_y.max(0).sum())
    h = float(along_x.max(1).sum())
    fill = area / max(w * h, 1e-6)
    y = np.arange(cov.shape[0], dtype=np.float64)
    rows = cov.sum(1)
    my = (rows * y).sum() / max(area, 1e-6)
    var = (rows * (y - my) ** 2).sum() / max(area, 1e-6)
    skew = (rows * (y - my) ** 3).sum() / max(area, 1e-6) / max(var, 1e-6) ** 1.5
    x = np.arange(cov.shape[1], dtype=np.float64)
    mx = (cov.sum(0) * x).sum() / max(area, 1e-6)
    # Coverage at the centroid (bilinear): ~0 in a ring's hole, ~1 inside every other shape,
    # and still low when blur has closed the hole of a small ring.
    y0, x0 = int(np.clip(np.floor(my), 0, cov.shape[0] - 2)), int(np.clip(np.floor(mx), 0, cov.shape[1] - 2))
    fy, fx = my - y0, mx - x0
    pad = np.pad(cov, ((0, 1), (0, 1)))
    centre = float((1 - fy) * (1 - fx) * pad[y0, x0] + (1 - fy) * fx * pad[y0, x0 + 1]
                   + fy * (1 - fx) * pad[y0 + 1, x0] + fy * fx * pad[y0 + 1, x0 + 1])
    binary = cov >= COVERAGE_THRESHOLD
    hole = _has_hole(binary) if binary.any() else 0
    aspect = w / max(h, 1e-6)
    feats = dict(w=round(w, 2), h=round(h, 2), area=round(area, 1), fill=round(fill, 3), hole=hole,
                 skew=round(float(skew), 3), aspect=round(aspect, 3), centre=round(centre, 3))
    if not (MIN_ASPECT <= aspect <= MAX_ASPECT) or fill < MIN_FILL:
        return "unknown", feats
    if hole >= MIN_HOLE or centre < RING_MAX_CENTRE:
        return "ring", feats
    if fill >= SQUARE_MIN_FILL:
        return "square", feats
    if skew < TRIANGLE_MAX_SKEW:
        return "triangle", feats
    if fill >= CIRCLE_MIN_FILL:
        return "circle", feats
    return "cross", feats


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in the mask."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _to_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    if image.size != (REFERENCE_SIZE, REFERENCE_SIZE):
        image = image.resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.BOX)
    return np.asarray(image, np.float32)


def detect(image) -> tuple[str, tuple[int, int, int], list[Detection]]:
    """Read an image: (background name, background RGB, detected objects, largest first)."""
    arr = _to_array(image)
    n = arr.shape[0]
    frame = np.concatenate([arr[:BORDER].reshape(-1, 3), arr[-BORDER:].reshape(-1, 3),
                            arr[BORDER:-BORDER, :BORDER].reshape(-1, 3), arr[BORDER:-BORDER, -BORDER:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)
    bg_name = _BACKGROUND_NAMES[int(np.argmin(np.linalg.norm(_BACKGROUND_LAB - _srgb_to_lab(bg), axis=-1)))]
    diff = arr - bg
    dist = np.linalg.norm(diff, axis=-1)
    labels = _components(dist > FOREGROUND_DISTANCE)
    cell = n / 3
    found = []
    for lab in range(1, int(labels.max()) + 1):
        comp = labels == lab
        if comp.sum() < MIN_AREA:
            continue
        # The object's colour: median of its interior (the component eroded by one pixel), which
        # is unbiased under pixel noise; thin objects fall back to their most distant pixels.
        core = comp & _erode(comp)
        if core.sum() < MIN_CORE:
            core = comp & (dist >= np.percentile(dist[comp], 60))
        rgb = np.median(arr[core], axis=0)
        vec = rgb - bg
        coverage = np.clip((diff @ vec) / max(float(vec @ vec), 1e-6), 0, 1.5)
        mask = comp & (coverage >= COVERAGE_THRESHOLD)
        if mask.sum() < MIN_AREA:
            continue
        colour, cdist = name_colour(rgb)
        ys, xs = np.nonzero(comp)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape, feats = classify_shape(np.where(comp, coverage, 0.0)[y0:y1, x0:x1])
        side = max(feats["w"], feats["h"])  # soft extents
        if mask.sum() > MAX_AREA_FRACTION * n * n or side > MAX_SIDE:
            shape = "unknown"
        ys, xs = np.nonzero(mask)
        wts = np.clip(coverage[comp], 0, 1)
        cys, cxs = np.nonzero(comp)
        cx, cy = float((cxs * wts).sum() / wts.sum()) + 0.5, float((cys * wts).sum() / wts.sum()) + 0.5
        size = "unknown" if side > MAX_SIDE else "large" if side >= LARGE_MIN_SIDE else "small"
        found.append(Detection(
            shape=shape, colour=colour, size=size,
            row=min(int(cy // cell), 2), col=min(int(cx // cell), 2), area=int(mask.sum()),
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), centroid=(cx, cy),
            rgb=tuple(int(round(v)) for v in rgb), colour_distance=cdist, features=feats))
    found.sort(key=lambda det: -det.area)
    return bg_name, tuple(int(round(v)) for v in bg), found


# ----------------------------------------------------------------------------- matching

def _hungarian(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost assignment for an n x m matrix with n <= m (rows all assigned)."""
    n, m = cost.shape
    INF = float("inf")
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=int)  # p[j]: row (1-based) assigned to column j
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, INF)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return [(int(p[j]) - 1, j - 1) for j in range(1, m + 1) if p[j]]


def match(expected: Iterable[ObjectSpec], detections: list[Detection]) -> dict[int, int]:
    """Map expected-object index -> detection index (Hungarian on the mismatch cost)."""
    exp = list(expected)
    if not exp or not detections:
        return {}
    cost = np.zeros((len(exp), len(detections)))
    for i, e in enumerate(exp):
        for j, det in enumerate(detections):
            c = 0.0
            if e.colour is not None:
                c += COST_WEIGHTS["colour"] * (e.colour != det.colour)
            if e.shape is not None:
                c += COST_WEIGHTS["shape"] * (e.shape != det.shape)
            if e.size is not None:
                c += COST_WEIGHTS["size"] * (e.size != det.size)
            if e.has_position:
                c += COST_WEIGHTS["position"] * ((e.row, e.col) != (det.row, det.col))
                # Tie-break by distance to the cell centre (in cells), below any mismatch.
                cell = REFERENCE_SIZE / 3
                c += 0.01 * np.hypot(det.centroid[0] / cell - e.col - 0.5, det.centroid[1] / cell - e.row - 0.5)
            cost[i, j] = c
    if len(exp) <= len(detections):
        return dict(_hungarian(cost))
    return {i: j for j, i in _hungarian(cost.T)}


# ----------------------------------------------------------------------------- scoring

@dataclass
class ObjectCheck:
    expected: ObjectSpec
    detection: Detection | None
    checks: dict[str, bool]


@dataclass
class ScoreReport:
    checks: dict[str, bool]          # every check by name, e.g. "object0.colour", "count[red circle]"
    objects: list[ObjectCheck]
    detections: list[Detection]
    background: str                  # detected background name
    spec: Spec

    @property
    def adherence(self) -> float:
        return sum(self.checks.values()) / max(len(self.checks), 1)

    @property
    def strict(self) -> bool:
        return all(self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [k for k, ok in self.checks.items() if not ok]


Target = Union[Scene, Spec, str]


def to_spec(target: Target) -> Spec:
    if isinstance(target, Spec):
        return target
    if isinstance(target, Scene):
        return spec_from_scene(target)
    if isinstance(target, str):
        return parse_caption(target)
    raise TypeError(f"cannot score against {type(target).__name__}")


def score(image, target: Target) -> ScoreReport:
    """Check ``image`` (PIL image or HxWx3 uint8 array) against a scene, spec or caption."""
    spec = to_spec(target)
    bg_name, _, dets = detect(image)
    assignment = match(spec.objects, dets)
    checks: dict[str, bool] = {}
    objects = []
    for i, e in enumerate(spec.objects):
        det = dets[assignment[i]] if i in assignment else None
        oc = {"present": det is not None}
        if e.colour is not None:
            oc["colour"] = det is not None and det.colour == e.colour
        if e.shape is not None:
            oc["shape"] = det is not None and det.shape == e.shape
        if e.size is not None:
            oc["size"] = det is not None and det.size == e.size
        if e.has_position:
            oc["position"] = det is not None and (det.row, det.col) == (e.row, e.col)
        objects.append(ObjectCheck(e, det, oc))
        checks.update({f"object{i}.{k}": v for k, v in oc.items()})
    groups: dict[tuple, int] = {}
    for e in spec.objects:
        groups[(e.colour, e.shape)] = groups.get((e.colour, e.shape), 0) + 1
    for (colour, shape), want in groups.items():
        got = sum((colour is None or d.colour == colour) and (shape is None or d.shape == shape) for d in dets)
        checks[f"count[{colour or 'any'} {shape or 'object'}]"] = got == want
    checks["no_extra"] = len(dets) <= len(spec.objects)
    if spec.background is not None:
        checks["background"] = bg_name == spec.background
    return ScoreReport(checks, objects, dets, bg_name, spec)


def summarise(reports: Iterable[ScoreReport]) -> dict[str, float]:
    """Aggregate reports: ``mean_adherence``, ``strict_rate``, ``n`` and the pass rate of each
    kind of check (``present``, ``colour``, ``shape``, ``size``, ``position``, ``count``,
    ``no_extra``, ``background``) over the reports where it was checked."""
    reports = list(reports)
    out: dict[str, float] = {"n": float(len(reports))}
    if not reports:
        return out
    out["mean_adherence"] = float(np.mean([r.adherence for r in reports]))
    out["strict_rate"] = float(np.mean([r.strict for r in reports]))
    kinds: dict[str, list[bool]] = {}
    for r in reports:
        for name, ok in r.checks.items():
            kind = name.split(".")[-1].split("[")[0]
            kinds.setdefault(kind, []).append(ok)
    out.update({kind: float(np.mean(v)) for kind, v in sorted(kinds.items())})
    return out


__all__ = [
    "Detection", "ObjectCheck", "ObjectSpec", "ScoreReport", "Spec", "classify_shape", "detect", "match",
    "name_colour", "parse_caption", "score", "spec_from_scene", "summarise", "to_spec",
]
