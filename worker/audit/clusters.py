"""Spectral Relevance Analysis at scale: cluster a class's maps without an n x n matrix.

SpRAy (Lapuschkin et al. 2019) clusters downsampled, normalised saliency maps of one
class: kNN graph -> normalised Laplacian embedding -> k-means, with the eigengap
suggesting k.  The dense n x n affinity dies at tens of thousands of maps; here we
*sample, then assign*: a uniform reservoir sample (at most ``sample_size`` maps per
class, drawn out of core by the audit's partial aggregates) is clustered, and every
map of the class is then assigned to the nearest cluster centroid in one more
streaming pass.  Memory is O(sample_size^2) whatever the number of rows.

Examples:
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(0, .05, (50, 4)) + [1, 0, 0, 0], rng.normal(0, .05, (30, 4)) + [0, 0, 0, 1]
    >>> result = spectral_clusters(np.vstack([a, b]))
    >>> result.k, sorted(np.bincount(result.labels).tolist())
    (2, [30, 50])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class Clustering:
    labels: np.ndarray  # (n_sample,) cluster of each sampled map
    k: int
    eigenvalues: np.ndarray
    centroids: np.ndarray  # (k, d) in the input space, for assigning every other map


@dataclass(frozen=True)
class Member:
    """A typical member of a cluster shown as an input ``image`` (H, W, 3 uint8) with its full-resolution ``map``."""

    image: np.ndarray
    map: np.ndarray


@dataclass(frozen=True)
class Cluster:
    """One SpRAy cluster of a group: its index, ``count`` of maps assigned to it over every row, ``share`` of the
    group, and ``mean_map`` (16 x 16); ``examples``: the sampled maps nearest its centroid (16 x 16 grids);
    ``members``: its most typical sampled input images with their maps (with interventions)."""

    cluster: int
    count: int
    share: float
    mean_map: np.ndarray = field(repr=False)
    examples: tuple = field(default=(), repr=False)
    members: tuple[Member, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "count": self.count, "share": self.share, "mean_map": self.mean_map.tolist()}


def affinity(x: np.ndarray, neighbours: int = 10):
    """The symmetric kNN graph of the rows of ``x`` (sparse n x n): each row's ``neighbours`` nearest
    (:func:`sklearn.neighbors.kneighbors_graph`, itself left out, duplicates kept at distance 0) weighted
    ``exp(-d^2 / sigma^2)``, sigma^2 the median squared neighbour distance; an edge kept if either end chose it."""
    from sklearn.neighbors import kneighbors_graph

    graph = kneighbors_graph(x, min(neighbours, len(x) - 1), mode="distance", include_self=False)
    d2 = graph.data ** 2
    apart = d2[d2 > 0]  # duplicates (empty maps, say) would make the scale 0 and cut every other edge
    sigma2 = float(np.median(apart)) if len(apart) else 1.0
    graph.data = np.exp(-d2 / sigma2)
    return graph.maximum(graph.T).tocsr()


def spectral_clusters(x: np.ndarray, max_k: int = 8, neighbours: int = 10, seed: int = 0) -> Clustering:
    """Cluster the rows of ``x`` (n, d), n up to a few thousand: the eigenvalues of the :func:`affinity` graph's
    normalised Laplacian (:func:`scipy.sparse.csgraph.laplacian`, ``normed=True``) choose k by their largest gap
    after the first; :class:`sklearn.cluster.SpectralClustering` on the same graph (its spectral embedding, then
    k-means++ with 10 starts, ``seed``) gives the labels."""
    import warnings

    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import SpectralClustering

    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 3:
        return Clustering(np.zeros(n, int), 1, np.zeros(0), x.mean(0, keepdims=True) if n else x)
    graph = affinity(x, neighbours)
    values = np.linalg.eigvalsh(laplacian(graph, normed=True).toarray())
    top = min(max_k, n - 1)
    gaps = np.diff(values[:top + 1])
    k = int(np.argmax(gaps[1:]) + 2) if top >= 2 and gaps[1:].max() > gaps[0] else 1
    if k == 1:
        return Clustering(np.zeros(n, int), 1, values[:top + 1], x.mean(0, keepdims=True))
    with warnings.catch_warnings():  # a graph in k pieces is the clearest case, not a problem
        warnings.filterwarnings("ignore", "Graph is not fully connected")
        labels = SpectralClustering(k, affinity="precomputed", n_init=10, random_state=seed).fit_predict(graph)
    centroids = np.array([x[labels == j].mean(0) for j in range(k) if (labels == j).any()])
    labels = np.unique(labels, return_inverse=True)[1]
    return Clustering(labels, len(centroids), values[:top + 1], centroids)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row of ``x`` (:func:`sklearn.metrics.pairwise_distances_argmin`)."""
    from sklearn.metrics import pairwise_distances_argmin

    return pairwise_distances_argmin(np.asarray(x, np.float64), np.asarray(centroids, np.float64))


def cluster_groups(groups: dict, seed: int = 0) -> dict:
    """SpRAy on each group's sample (a :class:`~worker.audit.aggregate.GroupSummary`'s ``sample``):
    {group: Clustering} for groups with enough sampled maps."""
    return {g: spectral_clusters(v.sample.reshape(len(v.sample), -1), seed=seed)
            for g, v in groups.items() if getattr(v, "sample", None) is not None and len(v.sample) >= 20}


def with_examples(groups: dict, fitted: dict, clusters: dict, per_cluster: int = 3) -> dict:
    """``clusters`` ({group: [Cluster]}) with each cluster's ``examples``: the sampled maps nearest its centroid
    (its most typical members)."""
    out = {}
    for group, found in clusters.items():
        if group not in fitted or fitted[group].k < 2:
            out[group] = found
            continue
        sample = groups[group].sample.reshape(len(groups[group].sample), -1)
        side = int(np.sqrt(sample.shape[1]))
        centroids = fitted[group].centroids
        out[group] = []
        for c in found:
            members = np.flatnonzero(fitted[group].labels == c.cluster)
            distance = ((sample[members] - centroids[c.cluster]) ** 2).sum(1)
            out[group].append(replace(c, examples=tuple(sample[i].reshape(side, -1)
                                                        for i in members[np.argsort(distance)[:per_cluster]])))
    return out
