"""Keeping the k most diverse: the selection is deterministic, never keeps a duplicate while
something different is left, and does at least as well as chance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from krea2kit.diversity.scores import distance_matrix, vendi_score
from krea2kit.diversity.select import select_diverse


def _clusters(rng, centres: int, per: int, d: int = 16, spread: float = 0.05) -> np.ndarray:
    c = rng.standard_normal((centres, d))
    return np.concatenate([c[i] + spread * rng.standard_normal((per, d)) for i in range(centres)])


@pytest.mark.parametrize("method", ["max-min", "vendi"])
def test_one_image_per_cluster(method):
    rng = np.random.default_rng(3)
    x = _clusters(rng, centres=3, per=4)  # rows 0-3, 4-7, 8-11
    kept = select_diverse(x, 3, method)
    assert sorted(i // 4 for i in kept) == [0, 1, 2]


@pytest.mark.parametrize("method", ["max-min", "vendi"])
def test_duplicates_are_not_kept_while_something_else_is_left(method):
    a, b, c = np.eye(3)
    x = np.stack([a, a, b, a, c, b])
    kept = select_diverse(x, 3, method)
    assert sorted(tuple(x[i]) for i in kept) == sorted([tuple(a), tuple(b), tuple(c)])
    # ties go to the lowest index: the first copy of each
    assert sorted(kept) == [0, 2, 4]


@pytest.mark.parametrize("method", ["max-min", "vendi"])
def test_deterministic_and_complete(method):
    x = np.random.default_rng(5).standard_normal((9, 6))
    first = select_diverse(x, 4, method)
    assert first == select_diverse(x.copy(), 4, method)
    assert len(set(first)) == 4
    everything = select_diverse(x, 20, method)
    assert sorted(everything) == list(range(9)) and everything[:4] == first  # greedy: a prefix
    assert select_diverse(x, 0, method) == [] and select_diverse(np.zeros((0, 6)), 3, method) == []


def test_beats_the_average_subset():
    rng = np.random.default_rng(11)
    x = _clusters(rng, centres=4, per=3, spread=0.4)
    k = 4
    subsets = list(itertools.combinations(range(len(x)), k))
    d = distance_matrix(x)
    min_dist = [min(d[i, j] for i, j in itertools.combinations(s, 2)) for s in subsets]
    vendis = [vendi_score(x[list(s)]) for s in subsets]

    maxmin = select_diverse(x, k, "max-min")
    got = min(d[i, j] for i, j in itertools.combinations(maxmin, 2))
    # farthest-point traversal is a 2-approximation of the best max-min dispersion in a metric:
    # the chord sqrt(2 (1 - cos)) between unit vectors is one, and it orders pairs as 1 - cos does
    assert np.sqrt(2 * got) >= np.sqrt(2 * max(min_dist)) / 2 - 1e-9 and got > np.mean(min_dist)
    greedy = vendi_score(x[select_diverse(x, k, "vendi")])
    assert greedy > np.mean(vendis) and greedy >= 0.95 * max(vendis)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="max-min"):
        select_diverse(np.eye(3), 2, "random")
