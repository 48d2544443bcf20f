"""Diversity scores of a batch of embeddings (rows, any scale; they are L2-normalised here).

* **mean pairwise cosine distance**: the mean of ``1 - cos(e_i, e_j)`` over the
  ``n (n - 1) / 2`` pairs (0 for identical images, 1 for orthogonal ones, up to 2); ``None``
  for fewer than two images.
* **Vendi score** (Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for
  Machine Learning", TMLR 2023, arXiv:2210.02410): with ``K`` the ``n x n`` cosine-similarity
  kernel (``K_ii = 1``), ``exp(-sum_i l_i log l_i)`` over the eigenvalues ``l_i`` of
  ``K / n``: the exponential of their Shannon entropy, "the effective number of distinct
  images": 1 when all are identical, ``n`` when all are mutually orthogonal.

Plain float64 numpy: the matrices are ``n x n`` for a batch of ``n`` images, so this is cheap
next to rendering one of them.
"""

from __future__ import annotations

import math
from typing import Any


def unit_rows(embeddings: Any) -> Any:
    """``embeddings`` (a torch tensor, numpy array or nested list, ``(n, d)``) as float64
    numpy rows of unit length (an all-zero row stays zero)."""
    import numpy as np

    if hasattr(embeddings, "detach"):  # a torch tensor, possibly on a device
        embeddings = embeddings.detach().to("cpu").double().numpy()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def similarity_matrix(embeddings: Any) -> Any:
    """The cosine-similarity kernel ``K`` (``n x n``, symmetric, entries in [-1, 1])."""
    import numpy as np

    x = unit_rows(embeddings)
    k = np.clip(x @ x.T, -1.0, 1.0)
    return (k + k.T) / 2  # exactly symmetric for eigvalsh


def distance_matrix(embeddings: Any) -> Any:
    """Cosine distances ``1 - K`` (zero on the diagonal)."""
    import numpy as np

    d = 1.0 - similarity_matrix(embeddings)
    np.fill_diagonal(d, 0.0)
    return d


def mean_pairwise_distance(embeddings: Any) -> float | None:
    """Mean cosine distance over all pairs; ``None`` for fewer than two rows."""
    import numpy as np

    d = distance_matrix(embeddings)
    n = d.shape[0]
    if n < 2:
        return None
    return float(d[np.triu_indices(n, k=1)].mean())


def vendi_from_kernel(kernel: Any) -> float:
    """The Vendi score of a similarity kernel with ones on its diagonal (0 for an empty one)."""
    import numpy as np

    k = np.asarray(kernel, dtype=np.float64)
    n = k.shape[0]
    if n == 0:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(k / n)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]  # 0 log 0 = 0; tiny negatives are rounding
    return float(math.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def vendi_score(embeddings: Any) -> float:
    """The Vendi score of the rows under the cosine-similarity kernel (see the module docstring)."""
    return vendi_from_kernel(similarity_matrix(embeddings))


def nearest_distances(embeddings: Any) -> list[float | None]:
    """Each row's cosine distance to its nearest other row (``None`` when it is alone)."""
    import numpy as np

    d = distance_matrix(embeddings)
    n = d.shape[0]
    if n < 2:
        return [None] * n
    d = d + np.diag(np.full(n, np.inf))
    return [float(v) for v in d.min(axis=1)]


def batch_scores(embeddings: Any, *, digits: int = 6) -> dict[str, Any]:
    """``{"images": n, "mean_distance": ..., "vendi": ...}``, rounded for JSON and metadata."""
    n = int(unit_rows(embeddings).shape[0])
    mean = mean_pairwise_distance(embeddings)
    return {"images": n, "mean_distance": None if mean is None else round(mean, digits),
            "vendi": round(vendi_score(embeddings), digits)}


__all__ = ["batch_scores", "distance_matrix", "mean_pairwise_distance", "nearest_distances", "similarity_matrix",
           "unit_rows", "vendi_from_kernel", "vendi_score"]
