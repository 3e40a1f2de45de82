"""Where to intervene: a class's regions, and its SpRAy clusters' when the class's mean dilutes them."""

import numpy as np

from dataclasses import replace

from worker.audit.aggregate import Group, GroupSummary
from worker.audit.clusters import Cluster
from worker.audit.localise import candidates, overlap, regions

GRID = 16
TRUE_0 = Group("true", 0)


def _grid(**cells):
    """A 16 x 16 mean map, L1-normalised, with a faint floor and the given cells hot: name=(y, x, value)."""
    grid = np.full((GRID, GRID), 0.01)
    for y, x, value in cells.values():
        grid[y, x] = value
    return grid / grid.sum()


def _groups():
    """Class 0: most images look at the centre; a fifth (cluster 1) at a mark in the top-right corner, which
    the class's mean shows at a fifth of the centre's strength -- under the regions' half-peak threshold."""
    centre, mark = _grid(c=(8, 8, 1.0)), _grid(m=(1, 14, 1.0))
    empty = np.zeros((GRID, GRID))
    groups = {TRUE_0: GroupSummary(100, 0.8 * centre + 0.2 * mark, empty, {})}
    for cls in (1, 2):
        groups[Group("true", cls)] = GroupSummary(100, _grid(o=(12, 3 + cls, 1.0)), empty, {})
    clusters = [Cluster(0, 80, 0.8, centre), Cluster(1, 20, 0.2, mark)]
    return groups, clusters


def _holds(box, y, x):
    return box[0] * GRID <= y < box[2] * GRID and box[1] * GRID <= x < box[3] * GRID


def test_a_mark_on_part_of_a_class_is_found_through_its_cluster():
    groups, clusters = _groups()
    from worker.audit.localise import contrast

    own = regions(contrast(groups, TRUE_0))
    assert own and not any(_holds(r["box"], 1, 14) for r in own)  # the class's mean alone misses the mark
    found = candidates(groups, TRUE_0, clusters)
    by_cluster = [(c, r["box"]) for c, r in found if c is not None]
    assert [c for c, _ in by_cluster] == [1]  # the centre cluster repeats the class's region: not again
    assert _holds(by_cluster[0][1], 1, 14)
    assert found[0][0] is None and _holds(found[0][1]["box"], 8, 8)  # the class's own region comes first


def test_small_clusters_and_single_clusters_add_nothing():
    groups, clusters = _groups()
    small = [replace(c, share=0.05) if c.cluster == 1 else c for c in clusters]
    assert all(c is None for c, _ in candidates(groups, TRUE_0, small))
    assert all(c is None for c, _ in candidates(groups, TRUE_0, clusters[:1]))
    assert all(c is None for c, _ in candidates(groups, TRUE_0, None))


def test_overlap_is_intersection_over_union():
    assert overlap((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert overlap((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert abs(overlap((0, 0, 0.5, 0.5), (0, 0.25, 0.5, 0.75)) - 1 / 3) < 1e-12


def test_a_cluster_region_is_probed_on_the_images_whose_maps_fall_in_it():
    """The audit's plumbing, with the real engine: the sample's maps are explained, assigned to the class's
    centroids, and a cluster's region is probed on that cluster's images only (skipped with too few)."""
    from worker.audit.clusters import Clustering
    from worker.audit.run import MIN_IMAGES, _interventions
    from tests.models import small_cnn
    from worker.engine.methods import GuidedBackprop

    groups, clusters = _groups()
    engine = GuidedBackprop(small_cnn(32, classes=3, seed=0), batch_size=8, preprocessing="scale01",
                            map_dtype="float32", target="predicted")
    rng = np.random.default_rng(0)
    # classes 1 and 2 have too few images to be probed themselves: they are the others (donors, transplants)
    samples = {c: rng.integers(0, 256, (8 if c == 0 else MIN_IMAGES - 1, 32, 32, 3), dtype=np.uint8)
               for c in range(3)}
    near = np.full(GRID * GRID, 1.0 / GRID ** 2)  # every L1-normalised map is nearer this than the far one
    far = np.full(GRID * GRID, 10.0)
    for members_of, expected in ((1, len(samples[0])), (0, None)):
        centroids = np.stack([near, far] if members_of == 0 else [far, near])
        fitted = {TRUE_0: Clustering(np.zeros(0, int), 2, np.zeros(0), centroids)}
        ids = {c: np.array([f"{c}#{i}" for i in range(len(v))], object) for c, v in samples.items()}
        probed = _interventions(groups, {TRUE_0: clusters}, fitted, engine, samples, ids)
        for p in probed:  # each example names its row, and is that row's image
            assert p.examples and all(np.array_equal(e.versions["original"].image,
                                                     samples[0][int(e.id.split("#")[1])]) for e in p.examples)
            assert all(e.id.startswith("0#") for e in p.examples) and p.to_dict()["examples"][0]["id"] == \
                p.examples[0].id
        from_cluster = [p for p in probed if p.cluster is not None]
        if expected is None:  # every map in cluster 0: cluster 1's region has no images, so it is not probed
            assert not from_cluster and len(samples[0]) >= MIN_IMAGES
        else:
            assert [(p.cls, p.cluster, p.probe["images"]) for p in from_cluster] == [(0, 1, expected)]
            assert _holds(from_cluster[0].box, 1, 14)
            assert from_cluster[0].mean_map is clusters[1].mean_map
        assert {p.cls for p in probed} == {0}
