"""The diversity scores against direct numpy computations, on cases with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from krea2kit.diversity.scores import (
    batch_scores,
    mean_pairwise_distance,
    nearest_distances,
    similarity_matrix,
    vendi_score,
)


def _vendi_by_svd(x: np.ndarray) -> float:
    """The Vendi score another way: K/n = X X^T / n shares its non-zero eigenvalues with
    X^T X / n, i.e. the squared singular values of X over n (X with unit rows)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False) ** 2 / x.shape[0]
    s = s[s > 1e-12]
    return float(np.exp(-(s * np.log(s)).sum()))


def _mean_distance_by_loops(x: np.ndarray) -> float:
    pairs = list(itertools.combinations(range(len(x)), 2))
    cos = [float(x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))) for i, j in pairs]
    return sum(1 - c for c in cos) / len(pairs)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_identical_images_score_one(n):
    x = np.tile(np.array([[0.3, -1.2, 2.0, 0.5]]), (n, 1))
    assert vendi_score(x) == pytest.approx(1.0, abs=1e-9)
    if n > 1:
        assert mean_pairwise_distance(x) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_orthogonal_images_score_n(n):
    x = np.eye(n) * 3.0  # any scale: rows are normalised
    assert vendi_score(x) == pytest.approx(float(n), rel=1e-9)
    assert mean_pairwise_distance(x) == pytest.approx(1.0, abs=1e-12)


def test_two_groups_of_duplicates_count_as_two():
    a, b = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    x = np.stack([a, a, a, b, b, b])
    assert vendi_score(x) == pytest.approx(2.0, rel=1e-9)


def test_random_batches_match_independent_numpy_computations():
    rng = np.random.default_rng(0)
    for n, d in [(2, 3), (6, 4), (9, 32), (12, 5)]:
        x = rng.standard_normal((n, d))
        assert vendi_score(x) == pytest.approx(_vendi_by_svd(x), rel=1e-9)
        assert mean_pairwise_distance(x) == pytest.approx(_mean_distance_by_loops(x), rel=1e-9)
        assert 1.0 - 1e-9 <= vendi_score(x) <= n + 1e-9
        k = similarity_matrix(x)
        assert np.allclose(np.diag(k), 1.0) and np.allclose(k, k.T)


def test_torch_tensors_give_the_same_scores_as_numpy():
    import torch

    x = np.random.default_rng(1).standard_normal((5, 8))
    assert vendi_score(torch.from_numpy(x).float()) == pytest.approx(vendi_score(x), rel=1e-5)


def test_vendi_of_a_known_kernel():
    # two unit vectors at 60 degrees: K = [[1, .5], [.5, 1]], eigenvalues of K/2: 0.75, 0.25
    x = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert vendi_score(x) == pytest.approx(expected, rel=1e-12)
    assert mean_pairwise_distance(x) == pytest.approx(0.5, abs=1e-12)


def test_nearest_distances_and_batch_summary():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert nearest_distances(x) == pytest.approx([0.0, 0.0, 1.0])
    assert nearest_distances(x[:1]) == [None]
    summary = batch_scores(x)
    assert summary["images"] == 3
    assert summary["mean_distance"] == pytest.approx(2 / 3, abs=1e-6)
    assert summary["vendi"] == pytest.approx(_vendi_by_svd(x), abs=1e-6)
    assert batch_scores(x[:1])["mean_distance"] is None and batch_scores(x[:1])["vendi"] == 1.0
