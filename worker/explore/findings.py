"""The audit's views for the explorer: each class's mean map, the findings and the confirmed shortcuts, each
linked to the slice of rows that shows it.

Read from an audit's ``audit.json`` (``guided-saliency audit --report DIR``); nothing here recomputes the audit.

Examples:
    >>> finding_slice({"kind": "true", "class_index": 3, "finding": "border-heavy"})
    'true=3&sort=-border_mass'
"""

from __future__ import annotations

import base64
import json
import posixpath

import numpy as np

from worker.audit.colormap import hot
from worker.audit.pictures import enlarge, with_box
from worker.audit.report import MEMBERS, PROBES, intervention_picture
from worker.data import storage

#: the statistic that shows each kind of finding, sorted from the most
SHOWN_BY = {"border-heavy": "border_mass", "off-centre": "border_enrichment", "outside-mask": "relevance_mass"}


def cluster_value(kind: str, cls, cluster: int) -> str:
    """The ``cluster=`` value of a group's cluster (:attr:`~worker.explore.slices.Slice.cluster`)."""
    return f"{kind}:{cls}:{cluster}"


def finding_slice(finding: dict, clusters: bool = False) -> str:
    """The query string of the rows behind a finding: its class (as it was grouped) or, with the audit's
    ``clusters`` at hand, its SpRAy cluster; sorted by what it is about."""
    kind, cls = finding.get("kind"), finding.get("class_index")
    key = {"true": "true", "predicted": "predicted"}.get(kind, "true")
    parts = [f"{key}={cls}"] if cls is not None else []
    if clusters and finding.get("cluster") is not None and cls is not None:
        parts.append(f"cluster={cluster_value(kind, cls, finding['cluster'])}")
    stat = next((v for k, v in SHOWN_BY.items() if str(finding.get("finding", "")).startswith(k)), None)
    if stat:
        parts.append(f"sort=-{stat}")
    return "&".join(parts)


def _data_url(picture: np.ndarray) -> str:
    from worker.explore.pictures import png

    return "data:image/png;base64," + base64.b64encode(png(picture)).decode()


def _mean_map(grid, box=None, scale: int = 8) -> str:
    picture = enlarge(hot(np.asarray(grid, np.float32)), scale)
    if box is not None:
        picture = with_box(picture, box, scale)
    return _data_url(picture)


class Audit:
    """An audit's report directory, as the explorer shows it (:meth:`view`)."""

    def __init__(self, report_dir: str):
        fs, root = storage.filesystem(report_dir)
        self.fs, self.root = fs, root
        path = posixpath.join(root, "audit.json")
        if fs.get_file_info(path).type.name != "File":
            raise FileNotFoundError(f"{report_dir} has no audit.json: give the directory guided-saliency audit "
                                    "wrote (--report)")
        with fs.open_input_stream(path) as handle:
            self.result = json.loads(handle.read())
        #: {row id: [(region number, example number, region, example)]}: the rows the interventions probed
        self._probed: dict[str, list] = {}
        for r, region in enumerate((self.result.get("interventions") or {}).get("regions", [])):
            for e, example in enumerate(region.get("examples") or []):
                self._probed.setdefault(example.get("id"), []).append((r, e, region, example))
        found = fs.get_file_info(posixpath.join(root, MEMBERS)).type.name == "File"
        #: the report's cluster_members.parquet (audits before it have none)
        self.members = report_dir.rstrip("/") + "/" + MEMBERS if found else None

    def probes(self, row_id: str) -> list[dict]:
        """Where the audit's interventions probed the row ``row_id``: per region its class, verdict and cluster, and
        the row's image in each version (the original and each fill, the region outlined) with the model's class
        and the probed class's logit."""
        out = []
        for r, e, region, example in self._probed.get(row_id, []):
            versions = [{"name": name, "predicted": v.get("predicted"), "logit": v.get("logit"),
                         "picture": self._picture(intervention_picture(r, e, name))}
                        for name, v in (example.get("versions") or {}).items()]
            out.append({"class": region.get("class"), "verdict": region.get("verdict"),
                        "cluster": region.get("cluster"), "versions": versions})
        return out

    def _picture(self, name: str) -> str | None:
        """A report picture under :data:`~worker.audit.report.PROBES` as a ``data:`` URL (None if it is gone)."""
        path = posixpath.join(self.root, PROBES, name)
        if self.fs.get_file_info(path).type.name != "File":
            return None
        with self.fs.open_input_stream(path) as handle:
            return "data:image/png;base64," + base64.b64encode(handle.read()).decode()

    def clusters(self) -> list[dict]:
        """The clusters of each group the audit split (none without its members file): the ``cluster=`` value,
        the group's kind and class, the cluster's number, count and share."""
        if self.members is None:
            return []
        out = []
        for g in self.result.get("clusters", []):
            found = g.get("clusters") or []
            cls = g.get("class_index") if g.get("class_index") is not None else g.get("class_name")
            if len(found) < 2 or cls is None:
                continue
            for c in found:
                out.append({"value": cluster_value(g.get("kind"), cls, c.get("cluster")), "kind": g.get("kind"),
                            "class_name": g.get("class_name") or str(cls), "cluster": c.get("cluster"),
                            "count": c.get("count"), "share": c.get("share")})
        return out

    def view(self) -> dict:
        """Classes with their mean maps, findings and confirmed shortcuts, each with the slice that shows it
        (made once)."""
        if getattr(self, "_view", None) is None:
            self._view = self._make_view()
        return self._view

    def _make_view(self) -> dict:
        groups = [g for g in self.result.get("groups", []) if g.get("kind") == "true"] or \
            [g for g in self.result.get("groups", []) if g.get("kind") == "predicted"]
        classes = [{"name": g.get("class_name") or str(g.get("class_index")), "index": g.get("class_index"),
                    "kind": g.get("kind"), "count": g.get("count"), "mean_map": _mean_map(g["mean_map"]),
                    "slice": f"{'true' if g.get('kind') == 'true' else 'predicted'}={g.get('class_index')}"}
                   for g in groups if g.get("mean_map") is not None]
        split = self.members is not None
        findings = [{**{k: f.get(k) for k in ("kind", "class_name", "severity", "finding", "detail", "verdict",
                                              "cluster")},
                     "slice": finding_slice(f, split)} for f in self.result.get("findings", [])]
        grids = {(g.get("kind"), g.get("class_index")): g.get("mean_map") for g in self.result.get("groups", [])}
        shortcuts = []
        names = {g.get("class_index"): g.get("class_name") for g in self.result.get("groups", [])}
        for region in (self.result.get("interventions") or {}).get("regions", []):
            if not region.get("shortcut"):
                continue
            cls = region.get("class", region.get("class_index"))
            grid = grids.get(("true", cls))
            box = None
            if grid is not None and region.get("box") is not None:  # fractions of the image -> grid cells
                n = len(grid)
                box = [round(v * n) for v in region["box"]]
            shortcuts.append({"class_name": names.get(cls, str(cls)), "verdict": region.get("verdict"),
                              "box": region.get("box"), "effect": region.get("effect"),
                              "picture": _mean_map(grid, box) if grid is not None else None,
                              "slice": finding_slice({"kind": "true", "class_index": cls})})
        clusters = [{**c, "slice": f"cluster={c['value']}"} for c in self.clusters()]
        return {"classes": classes, "findings": findings, "shortcuts": shortcuts, "clusters": clusters}
