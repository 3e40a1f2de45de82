"""Findings: severity-ranked observations on the per-class mean maps, statistics and clusters.

A class is flagged when its mean map is border-heavy or off-centre (absolutely, or as an outlier among the
classes by a robust z-score), when its maps' mass sits outside the ground-truth masks, or when a small
cluster of its maps looks somewhere else than the rest.  Pure numpy on the merged aggregates.  A finding names
its :class:`Group`; as a table row or in audit.json, by the group's columns (``kind``, ``class_index``,
``class_name``: :meth:`Group.columns`).

Examples:
    >>> corner = np.zeros((16, 16)); corner[0, 0] = 1.0
    >>> summary = GroupSummary(5, corner, np.zeros((16, 16)), {})
    >>> [f.finding for f in findings({Group("true", 0): summary})]
    ['border-heavy', 'off-centre']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.audit.aggregate import Group, GroupSummary
from worker.audit.intervene import STAMP_IMAGES
from worker.data.stats import border_share, centre_of_mass

SMALL_CLUSTER = 0.15  # a cluster with at most this share of its class is "small"
BORDER_ENRICHMENT_FLAG = 1.5  # the 16x16 frame covers 44 % of the area: at most 2.3x
OFF_CENTRE_FLAG = 0.2
MASK_ENERGY_FLAG = 0.5
OUTLIER_Z = 4.0  # a class this many robust standard deviations from the other classes is flagged
MIN_EFFECT = {"border-heavy": 0.1, "off-centre": 0.05}  # and at least this far from the classes' median


@dataclass(frozen=True)
class Finding:
    """One observation on a :class:`Group`: its ``severity`` ("high", "medium", "low"), what was ``finding`` and
    the ``detail`` in words.  A finding from an intervention (:func:`intervention_findings`) carries its probed
    region's ``box`` ([0, 1] image fractions), median ``effect``, the fills' ``interval``, ``verdict``,
    ``shortcut``, ``stamped_share`` and SpRAy ``cluster`` (None for the class's own region); the others leave
    them None."""

    group: Group
    severity: str
    finding: str
    detail: str
    box: list | None = None
    effect: float | None = None
    interval: list | None = None
    verdict: str | None = None
    shortcut: bool | None = None
    stamped_share: float | None = None
    cluster: int | None = None

    def to_dict(self, names=None) -> dict:
        """As audit.json and findings.parquet hold it: the group's columns (classes named with ``names``), then the
        finding; the intervention's fields where it has them."""
        out = {**self.group.columns(names), "severity": self.severity, "finding": self.finding, "detail": self.detail}
        if self.verdict is not None:
            out.update(box=self.box, effect=self.effect, interval=self.interval, verdict=self.verdict,
                       shortcut=self.shortcut, stamped_share=self.stamped_share, cluster=self.cluster)
        return out


def shape_of(mean: np.ndarray) -> tuple[float, float, float]:
    """(border enrichment, centre-of-mass y, x) of a mean map (0 and the centre for a map with no mass)."""
    total = float(mean.sum())
    if total <= 0:
        return 0.0, 0.5, 0.5
    p = (mean / total)[None]
    (cy,), (cx,) = centre_of_mass(p)
    return float(border_share(p)[1][0]), float(cy), float(cx)


def _robust_z(values: dict) -> dict:
    """(x - median) / (1.4826 MAD) over the classes; empty with fewer than 5 classes."""
    if len(values) < 5:
        return {}
    x = np.array(list(values.values()))
    median = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - median))
    scale = max(mad, 0.05 * abs(median), 1e-6)
    return {g: (v - median) / scale for g, v in values.items()}


def findings(groups: dict, clusters: dict | None = None) -> list[Finding]:
    """Severity-ranked observations on the per-class mean maps and statistics (``groups``: {Group:
    GroupSummary}; ``clusters``: {Group: [Cluster]})."""
    out = []
    for group, found in (clusters or {}).items():
        if len(found) < 2:
            continue
        for c in found:
            enrichment, cy, cx = shape_of(c.mean_map)
            odd = enrichment >= BORDER_ENRICHMENT_FLAG or np.hypot(cy - 0.5, cx - 0.5) >= OFF_CENTRE_FLAG
            if c.share <= SMALL_CLUSTER and c.count >= 3 and odd:
                out.append(Finding(group, "high", "small cluster looks elsewhere",
                                   f"cluster {c.cluster} ({c.count} maps, {c.share:.0%} of the class): "
                                   f"border enrichment {enrichment:.1f}, centre (y={cy:.2f}, x={cx:.2f})"))
    for kind in ("true", "predicted"):
        members = {g: v for g, v in groups.items() if isinstance(g, Group) and g.kind == kind and v.count}
        if not members:
            continue
        shape = {g: shape_of(v.mean_map) for g, v in members.items()}
        measures = {
            "border-heavy": {g: s[0] for g, s in shape.items()},
            "off-centre": {g: float(np.hypot(s[1] - 0.5, s[2] - 0.5)) for g, s in shape.items()},
        }
        absolute = {"border-heavy": BORDER_ENRICHMENT_FLAG, "off-centre": OFF_CENTRE_FLAG}
        for name, values in measures.items():
            median = float(np.median(list(values.values())))
            z = {g: v for g, v in _robust_z(values).items() if values[g] - median >= MIN_EFFECT[name]}
            for g, value in values.items():
                enrichment, cy, cx = shape[g]
                where = f"border enrichment {enrichment:.2f}, centre of mass (y={cy:.2f}, x={cx:.2f})"
                if value >= absolute[name]:
                    out.append(Finding(g, "high", name, where))
                elif z.get(g, 0) >= OUTLIER_Z:
                    out.append(Finding(g, "medium", f"{name} compared with other classes",
                                       f"{where}; robust z = {z[g]:.1f} over {len(values)} classes"))
        for g, v in members.items():
            mask = v.stats.get("energy_in_mask")
            if mask and mask.n and mask.mean < MASK_ENERGY_FLAG:
                out.append(Finding(g, "high", "mass outside masks",
                                   f"mean energy inside the ground-truth masks is {mask.mean:.2f}"))
    return sorted(out, key=order)


def order(finding: Finding) -> tuple:
    """High severity first, then by group."""
    return finding.severity != "high", finding.group._order()


def intervention_findings(probed: list) -> list[Finding]:
    """One finding per probed region (:class:`~worker.audit.intervene.ProbedRegion`), from a *confirmed* shortcut
    or a *shortcut with the object* (high) to *attention without effect* (low); the box, the median effect over
    the fills and its fills' intervals, and the share of the region's pixels stamped (the same in every image)."""
    out = []
    for p in probed:
        q = p.probe
        y0, x0, y1, x1 = q["box"]
        fills = ", ".join(f"{how}: {f['flip_rate']:.0%} vs {f['control_flip_rate']:.0%} "
                          f"[{f['interval'][0]:+.2f}, {f['interval'][1]:+.2f}]" for how, f in q["fills"].items())
        low = min(f["interval"][0] for f in q["fills"].values())
        high = max(f["interval"][1] for f in q["fills"].values())
        severity = "high" if q["shortcut"] else "medium" if q["needed"] else "low"
        finding = {"confirmed": "shortcut confirmed by intervention",
                   "decisive region (large)": "large region needed and sufficient (the object?)",
                   "shortcut with the object": "shortcut: a stamped artifact the class needs, with the object",
                   "needed, not sufficient": "region needed, not sufficient: part of the object (it varies)"
                   if q["images"] >= STAMP_IMAGES else
                   "region needed, not sufficient (too few images to tell an artifact from the object)"}
        where = "" if p.cluster is None else f"SpRAy cluster {p.cluster} ({q['images']} images): "
        stamped = (f"{q['stamp']['stamped_share']:.0%} of its pixels the same in every image"
                   if q["images"] >= STAMP_IMAGES else
                   f"too few images ({q['images']} < {STAMP_IMAGES}) to tell an artifact by its stamp")
        out.append(Finding(
            Group("true", q["class"]), severity, finding.get(q["verdict"], "attention without effect"),
            f"{where}region y {y0:.2f}-{y1:.2f}, x {x0:.2f}-{x1:.2f}: flips when neutralised vs at random places "
            f"({fills}); pasted into other classes it moves {q['sufficiency']['moved_to_class']:.0%} to the class "
            f"(random box {q['sufficiency']['control_moved']:.0%}); {stamped}",
            box=[float(v) for v in q["box"]], effect=q["effect"], interval=[low, high], verdict=q["verdict"],
            shortcut=q["shortcut"], stamped_share=q["stamp"]["stamped_share"], cluster=p.cluster))
    return out
