"""krea2kit's own image embedder for diversity scores: ``lab-hog``, weight-free and offline.

Two hand-made views of an image, concatenated and then mixed by a fixed random projection:

* **colour layout**: the mean CIE L*a*b* colour of an 8x8 grid of cells (where which
  colour is; Lab so that equal steps look roughly equally different to people);
* **gradient orientations**: a histogram of edge orientations (8 unsigned bins, weighted by
  the gradient magnitude of L*) in each cell of a 4x4 grid, as in HOG (Dalal & Triggs 2005)
  without block normalisation: which shapes and textures are where.

The ``1 + 192 + 128``-long vector is projected to :data:`DIM` dimensions by a Gaussian matrix
drawn once from a fixed seed with numpy's legacy ``RandomState`` (its stream is frozen by
NEP 19, so the embeddings do not change between numpy versions), then L2-normalised. The
projection keeps inner products up to a small distortion (Johnson-Lindenstrauss) and gives
every image the same length ``DIM`` whatever the feature layout. Everything is float64 numpy
on a 64x64 copy of the image: deterministic, about a millisecond an image, no torch work.

It measures how different images *look* (colour, layout, edges), not what they depict: for
semantic diversity use a learned embedder (``plugins/krea2kit-embeddings``: CLIP, DINOv2).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

NAME = "lab-hog-1"  # the method's version: bump it when the features change (recorded in metadata)
DIM = 256
SIZE = 64  # working resolution (pixels a side)
GRID = 8  # colour layout cells per side
HOG_GRID = 4  # orientation histogram cells per side
BINS = 8  # unsigned orientations over [0, pi)
SEED = 20_240_716  # the projection's seed (any fixed number; changing it changes NAME)
# Weights of the parts of the vector before projection. The colour block is scaled so a
# plain white image has length 1; the orientation block is unit length when the image has
# any edge; the constant lets two flat images of one colour still be identical (cosine 1)
# rather than undefined.
COLOUR_WEIGHT = 1.0
EDGE_WEIGHT = 1.0
BIAS = 0.5

# sRGB (IEC 61966-2-1) to CIE XYZ, D65 white, and the D65 reference white.
_SRGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
                (0.2126729, 0.7151522, 0.0721750),
                (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)


def srgb_to_lab(rgb: Any) -> Any:
    """``(..., 3)`` sRGB values in [0, 1] -> CIE L*a*b* (L in [0, 100], a and b about ±100)."""
    import numpy as np

    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.asarray(_SRGB_TO_XYZ).T / np.asarray(_WHITE)
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def _cells(values: Any, grid: int) -> Any:
    """``(S, S, C)`` -> ``(grid, grid, S/grid, S/grid, C)``: the pixels of each cell."""
    s, _, c = values.shape
    k = s // grid
    return values.reshape(grid, k, grid, k, c).transpose(0, 2, 1, 3, 4)


def features(image: Any) -> Any:
    """The unprojected feature vector of one image (float64, length 1 + 192 + 128)."""
    import numpy as np
    from PIL import Image

    small = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    lab = srgb_to_lab(np.asarray(small, dtype=np.float64) / 255.0)

    # colour layout: mean Lab per cell, L centred on mid-grey; /50 puts L, a, b on like scales
    means = _cells(lab, GRID).mean(axis=(2, 3))
    colour = np.concatenate([(means[..., :1] - 50.0) / 50.0, means[..., 1:] / 50.0], axis=-1).ravel()
    colour *= COLOUR_WEIGHT / np.sqrt(GRID * GRID)

    # orientation histograms of L* (Sobel gradients, edges replicated)
    light = np.pad(lab[..., 0] / 100.0, 1, mode="edge")
    left, right = light[:, :-2], light[:, 2:]
    up, down = light[:-2, :], light[2:, :]
    gx = (right[:-2] + 2 * right[1:-1] + right[2:]) - (left[:-2] + 2 * left[1:-1] + left[2:])
    gy = (down[:, :-2] + 2 * down[:, 1:-1] + down[:, 2:]) - (up[:, :-2] + 2 * up[:, 1:-1] + up[:, 2:])
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    bins = np.minimum((angle / (np.pi / BINS)).astype(np.int64), BINS - 1)
    onehot = (bins[..., None] == np.arange(BINS)) * magnitude[..., None]
    edges = _cells(onehot, HOG_GRID).sum(axis=(2, 3)).ravel()
    norm = float(np.linalg.norm(edges))
    # below this the image is flat: rounding noise would otherwise become a unit vector
    edges = edges * (EDGE_WEIGHT / norm) if norm > 1e-6 else np.zeros_like(edges)

    return np.concatenate([[BIAS], colour, edges])


@lru_cache(maxsize=1)
def projection() -> Any:
    """The fixed ``(1 + 192 + 128, DIM)`` Gaussian projection (see the module docstring)."""
    import numpy as np

    length = 1 + GRID * GRID * 3 + HOG_GRID * HOG_GRID * BINS
    matrix = np.random.RandomState(SEED).standard_normal((length, DIM)) / np.sqrt(DIM)
    matrix.setflags(write=False)
    return matrix


class LabHogEmbedder:
    """The ``lab-hog`` embedder (:class:`krea2kit.contracts.Embedder`)."""

    name = NAME
    dim = DIM

    def embed(self, images: Sequence[Any]) -> Any:
        import numpy as np
        import torch

        if not images:
            return torch.zeros(0, DIM)
        projected = np.stack([features(image) for image in images]) @ projection()
        projected /= np.linalg.norm(projected, axis=1, keepdims=True)  # never 0: the bias term
        return torch.from_numpy(projected.astype(np.float32))


def load(options: Any, context: Any) -> LabHogEmbedder:
    return LabHogEmbedder()
