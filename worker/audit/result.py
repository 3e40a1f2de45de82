"""The audit's result, typed: what :func:`~worker.audit.run.run_audit` returns, what the report and the tables
render, and what audit.json holds (:meth:`AuditResult.to_dict`).

Each part is made once, by the step that computes it, and never changed after:

* ``groups``: {:class:`~worker.audit.aggregate.Group`: :class:`~worker.audit.aggregate.GroupSummary`} (the merged
  aggregates of every group of rows);
* ``worst``: {statistic: :class:`~worker.audit.aggregate.WorstCases`} (the worst rows, with their input images
  where the input could be read);
* ``clusters``: {group: [:class:`~worker.audit.clusters.Cluster`]} (SpRAy);
* ``findings``: [:class:`~worker.audit.findings.Finding`], high severity first;
* ``controls`` (:class:`~worker.audit.controls.Controls`), ``interventions``
  (:class:`Interventions`) and ``method_comparison`` (:class:`MethodComparison`), None where not run;
* ``class_images``: {class: its mean input image}; ``skipped``: why the model steps did not run (None when they
  did or were not asked for); ``notes``: what the report says of a part it cannot show.

Examples:
    >>> import numpy as np
    >>> from worker.audit.aggregate import Group, GroupSummary
    >>> result = AuditResult("maps/", {"class_names": ["cat", "dog"]},
    ...                      {Group("true", 1): GroupSummary(3, np.zeros((16, 16)), np.zeros((16, 16)), {})})
    >>> result.names, result.rows, result.to_dict()["groups"][0]["class_name"]
    (['cat', 'dog'], 0, 'dog')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from worker.audit.aggregate import Group, GroupSummary, WorstCases
from worker.audit.controls import Controls
from worker.audit.findings import Finding
from worker.audit.intervene import ProbedRegion


@dataclass(frozen=True)
class Interventions:
    """The interventions' section: ``images_per_class`` probed, every :class:`~worker.audit.intervene.ProbedRegion`,
    the ``seconds`` they took and their ``cost`` in forward passes, in words."""

    images_per_class: int
    regions: list[ProbedRegion]
    seconds: float
    cost: str

    def verdicts(self) -> str:
        """How many regions got each verdict: ``2 confirmed, 1 attention without effect``."""
        found = [p.verdict for p in self.regions]
        return ", ".join(f"{found.count(v)} {v}" for v in dict.fromkeys(found)) or "no region to probe"

    def to_dict(self) -> dict:
        return {"images_per_class": self.images_per_class, "regions": [p.to_dict() for p in self.regions],
                "seconds": self.seconds, "cost": self.cost}


@dataclass(frozen=True)
class MethodComparison:
    """The comparison of methods (:func:`~worker.audit.compare.compare_methods`): ``summary``, its numbers per
    method and the sample's (as audit.json holds them, with its ``sentence``), and ``rows``, one per (method,
    image, metric) (method_comparison.parquet)."""

    summary: dict
    rows: list[dict] = field(repr=False)

    @classmethod
    def of(cls, section: dict) -> "MethodComparison":
        return cls({k: v for k, v in section.items() if k != "rows"}, section["rows"])

    @property
    def sentence(self) -> str:
        """Which methods' maps to trust on this model, and why (or why not)."""
        return self.summary["sentence"]

    @property
    def seconds(self) -> float:
        return self.summary["seconds"]

    def to_dict(self) -> dict:
        return self.summary


@dataclass(frozen=True)
class AuditResult:
    """An audit of a job's output (see the module's text for its parts); ``metadata``: the job's recorded
    metadata, as read from its output."""

    output: str
    metadata: dict = field(repr=False)
    groups: dict[Group, GroupSummary]
    worst: dict[str, WorstCases] = field(default_factory=dict)
    clusters: dict[Group, list] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    controls: Controls | None = None
    interventions: Interventions | None = None
    method_comparison: MethodComparison | None = None
    class_images: dict = field(default_factory=dict, repr=False)
    skipped: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list | None:
        """The classes' names, when the job recorded them (``JobConfig(extra_metadata={"class_names": [...]})``)."""
        names = self.metadata.get("class_names")
        return names if isinstance(names, list) and names else None

    @property
    def rows(self) -> int:
        """The maps aggregated (every row is in one group by its predicted class)."""
        return sum(v.count for g, v in self.groups.items() if g.kind == "predicted")

    def high(self) -> list[Finding]:
        """The findings of high severity."""
        return [f for f in self.findings if f.severity == "high"]

    def to_dict(self) -> dict:
        """audit.json: the numbers, plain JSON values (classes by their columns, :meth:`Group.columns`); the
        pictures and the sampled maps stay out."""
        names = self.names
        return {
            "output": self.output,
            "groups": [{**g.columns(names), "count": v.count, "mean_map": v.mean_map.tolist(),
                        "stats": {k: s.to_dict() for k, s in v.stats.items()}} for g, v in self.groups.items()],
            "worst": {name: w.to_dict() for name, w in self.worst.items()},
            "clusters": [{**g.columns(names), "clusters": [c.to_dict() for c in cs]}
                         for g, cs in self.clusters.items()],
            "findings": [f.to_dict(names) for f in self.findings],
            "controls": self.controls and self.controls.to_dict(),
            "interventions": self.interventions and self.interventions.to_dict(),
            "method_comparison": self.method_comparison and self.method_comparison.to_dict(),
            "skipped": self.skipped,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as audit.json's text."""
        return json.dumps(self.to_dict(), indent=1, default=_plain)

    def summary(self, report_dir: str | None = None) -> dict:
        """The command line's summary of the audit: the report's folder, how many groups, the findings and, where
        the model steps were skipped, why."""
        return {"report": report_dir, "groups": len(self.groups),
                "findings": [f.to_dict(self.names) for f in self.findings],
                **({"skipped": self.skipped} if self.skipped else {})}


def _plain(value):
    """numpy scalars and arrays as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
