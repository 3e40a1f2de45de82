"""Spectral Relevance Analysis at scale: cluster a class's maps without an n x n matrix.

SpRAy (Lapuschkin et al. 2019) clusters downsampled, normalised saliency maps of one
class: kNN graph -> normalised Laplacian embedding -> k-means, with the eigengap
suggesting k.  The dense n x n affinity dies at tens of thousands of maps; here we
*sample, then assign*: a uniform reservoir sample (at most ``sample_size`` maps per
class, drawn out of core by the audit's partial aggregates) is clustered, and every
map of the class is then assigned to the nearest cluster centroid in one more
streaming pass.  Memory is O(sample_size^2) whatever the number of rows.

Example:
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(0, .05, (50, 4)) + [1, 0, 0, 0], rng.normal(0, .05, (30, 4)) + [0, 0, 0, 1]
    >>> result = spectral_clusters(np.vstack([a, b]))
    >>> result.k, sorted(np.bincount(result.labels).tolist())
    (2, [30, 50])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Clustering:
    labels: np.ndarray  # (n_sample,) cluster of each sampled map
    k: int
    eigenvalues: np.ndarray
    centroids: np.ndarray  # (k, d) in the input space, for assigning every other map


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 100) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))])
    centres = np.array(centres)
    labels = np.zeros(len(x), int)
    for _ in range(iterations):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if (new == labels).all() and _ > 0:
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
    return labels


def spectral_clusters(x: np.ndarray, max_k: int = 8, neighbours: int = 10, seed: int = 0) -> Clustering:
    """Cluster the rows of ``x`` (n, d), n up to a few thousand."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 3:
        return Clustering(np.zeros(n, int), 1, np.zeros(0), x.mean(0, keepdims=True) if n else x)
    squares = (x ** 2).sum(1)
    d2 = np.maximum(squares[:, None] + squares[None] - 2 * x @ x.T, 0)
    np.fill_diagonal(d2, np.inf)
    m = min(neighbours, n - 1)
    nearest = np.argpartition(d2, m - 1, axis=1)[:, :m]
    knn_d2 = np.take_along_axis(d2, nearest, 1)
    sigma2 = np.median(knn_d2) or 1e-12
    w = np.zeros((n, n))
    np.put_along_axis(w, nearest, np.exp(-knn_d2 / sigma2), 1)
    w = np.maximum(w, w.T)
    degree = w.sum(1)
    inv = np.where(degree > 0, 1 / np.sqrt(np.where(degree > 0, degree, 1)), 0)
    laplacian = np.eye(n) - inv[:, None] * w * inv[None]
    values, vectors = np.linalg.eigh(laplacian)
    top = min(max_k, n - 1)
    gaps = np.diff(values[:top + 1])
    k = int(np.argmax(gaps[1:]) + 2) if top >= 2 and gaps[1:].max() > gaps[0] else 1
    if k == 1:
        return Clustering(np.zeros(n, int), 1, values[:top + 1], x.mean(0, keepdims=True))
    embedding = vectors[:, :k]
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True) + 1e-12
    labels = _kmeans(embedding, k, np.random.default_rng(seed))
    centroids = np.array([x[labels == j].mean(0) for j in range(k) if (labels == j).any()])
    labels = np.unique(labels, return_inverse=True)[1]
    return Clustering(labels, len(centroids), values[:top + 1], centroids)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row of ``x``."""
    x = np.asarray(x, np.float64)
    return (((x[:, None, :] - centroids[None]) ** 2).sum(-1)).argmin(1)


def cluster_groups(groups: dict, seed: int = 0) -> dict:
    """SpRAy on each group's sample: {group: Clustering} for groups with enough sampled maps."""
    return {g: spectral_clusters(v["sample"].reshape(len(v["sample"]), -1), seed=seed)
            for g, v in groups.items() if "sample" in v and len(v["sample"]) >= 20}


def add_cluster_examples(groups: dict, fitted: dict, clusters: dict, per_cluster: int = 3) -> None:
    """Attach to each cluster the sampled maps nearest its centroid (its most typical members)."""
    for group, found in clusters.items():
        if group not in fitted or fitted[group].k < 2:
            continue
        sample = groups[group]["sample"].reshape(len(groups[group]["sample"]), -1)
        centroids = fitted[group].centroids
        for c in found:
            members = np.flatnonzero(fitted[group].labels == c["cluster"])
            distance = ((sample[members] - centroids[c["cluster"]]) ** 2).sum(1)
            c["examples"] = [sample[i].reshape(int(np.sqrt(sample.shape[1])), -1) for i in members[np.argsort(distance)[:per_cluster]]]
