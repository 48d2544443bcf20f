"""Keep the ``k`` most diverse of ``n`` embeddings: greedy, deterministic selection.

Both methods start from the image farthest on average from all the others (the least
typical one) and then add one image at a time:

* ``"max-min"``: the image whose cosine distance to its nearest already kept image is
  largest (farthest-point traversal, Gonzalez 1985; the classic greedy for max-min
  dispersion). It never keeps a near-duplicate while something different is left.
* ``"vendi"``: the image that raises the Vendi score of the kept set the most (greedy
  maximisation of the Vendi score; slower, ``O(n k^4)``, and it weighs the whole kept set
  rather than the closest pair).

Ties go to the lower index, so the same embeddings always give the same selection (no
randomness; the result does not depend on anything but the rows' order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from krea2kit.diversity.scores import distance_matrix, similarity_matrix, vendi_from_kernel

METHODS = ("max-min", "vendi")
# Scores closer than this count as a tie (rounding noise must not pick a higher index).
_TIE = 1e-12


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best] + _TIE:
            best = i
    return best


def select_diverse(embeddings: Any, k: int, method: str = "max-min") -> list[int]:
    """Indices of the ``k`` rows to keep, in the order they were chosen (the first is the
    most atypical); all rows, in that order, when ``k >= n``."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {', '.join(METHODS)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    distances = distance_matrix(embeddings)
    n = distances.shape[0]
    if n == 0 or k == 0:
        return []
    kernel = similarity_matrix(embeddings) if method == "vendi" else None
    chosen = [_argmax(distances.sum(axis=1).tolist())]
    left = [i for i in range(n) if i != chosen[0]]
    nearest = distances[chosen[0]].copy()  # max-min: each row's distance to the nearest kept one
    while left and len(chosen) < k:
        if method == "max-min":
            gains = nearest[left].tolist()
        else:
            gains = [vendi_from_kernel(kernel[[*chosen, i]][:, [*chosen, i]]) for i in left]
        pick = left[_argmax(gains)]
        chosen.append(pick)
        left.remove(pick)
        nearest = np.minimum(nearest, distances[pick])
    return chosen


__all__ = ["METHODS", "select_diverse"]
