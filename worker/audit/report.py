"""The audit's report, rendered from an :class:`~worker.audit.result.AuditResult`: its numbers as Arrow tables
(:func:`tables`), audit.json (:meth:`~worker.audit.result.AuditResult.to_json`) and one self-contained HTML page
(:func:`render_html`, from the Jinja2 template :data:`~worker.audit.template.PAGE`) that leads with its answer
(the confirmed shortcuts, with their pictures; or why the model steps were skipped), then per class the mean
image, mean map and contrast, worst cases, controls, the comparison of methods, interventions, clusters, every
finding and the run card.  The renderers return text and tables; :func:`write_report` writes them, and
:class:`ClusterMembers` streams the one table too long to hold (each map's cluster).  Pictures:
:mod:`worker.audit.pictures`.

Examples:
    >>> from worker.audit.result import AuditResult
    >>> page = render_html(AuditResult("maps/", {}, {}, skipped="controls skipped: the model needs an opt-in"))
    >>> "Model steps not run." in page and "the model needs an opt-in" in page
    True
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.audit.aggregate import GRID, MEMBER_SCHEMA, SAMPLE_SIZE, Group, cluster_members
from worker.audit.pictures import enlarge, heat, overlay, png, png64, shortcut_panels, with_box


def tables(result) -> dict[str, pa.Table]:
    """The audit's numbers as Arrow tables: ``classes`` (one row per group: count, 16x16 mean and variance
    maps, mean/std of every statistic), ``clusters``, ``findings`` and, with the comparison of methods,
    ``method_comparison`` (one row per method, image and metric); tables without columns are left out."""
    names = result.names
    rows = []
    for group, v in result.groups.items():
        row = {**group.columns(names), "count": v.count,
               "mean_map": v.mean_map.astype(np.float32).reshape(-1).tolist(),
               "var_map": v.var_map.astype(np.float32).reshape(-1).tolist()}
        for name, stat in v.stats.items():
            row[f"{name}_mean"], row[f"{name}_std"] = stat.mean, stat.std
        rows.append(row)
    classes = pa.Table.from_pylist(rows)
    grid_type = pa.fixed_shape_tensor(pa.float32(), [GRID, GRID])
    for name in ("mean_map", "var_map"):
        if classes.num_rows:
            storage = pa.array(classes[name].to_pylist(), pa.list_(pa.float32(), GRID * GRID))
            classes = classes.set_column(classes.schema.get_field_index(name), name,
                                         pa.ExtensionArray.from_storage(grid_type, storage))
    clusters = pa.Table.from_pylist([{**g.columns(names), "cluster": c.cluster, "count": c.count, "share": c.share}
                                     for g, cs in result.clusters.items() for c in cs])
    found = [f.to_dict(names) for f in result.findings]
    keys = list(dict.fromkeys(k for f in found for k in f))  # intervention findings add columns
    out = {"classes": classes, "clusters": clusters,
           "findings": pa.Table.from_pylist([{k: f.get(k) for k in keys} for f in found])}
    if result.method_comparison is not None:
        out["method_comparison"] = pa.Table.from_pylist(result.method_comparison.rows)
    return {name: table for name, table in out.items() if table.num_columns}


MEMBERS = "cluster_members.parquet"


class ClusterMembers:
    """``report_dir/cluster_members.parquet`` (:data:`~worker.audit.aggregate.MEMBER_SCHEMA`): each map's SpRAy
    cluster in every group the audit split, streamed from the assignment pass (:meth:`tee`) so that no number of
    rows is held; written under a temporary name and in place only once :meth:`close` is called (a group that is
    not split has no rows: its maps are all one cluster)."""

    def __init__(self, report_dir: str):
        os.makedirs(report_dir, exist_ok=True)
        self.path = os.path.join(report_dir, MEMBERS)
        self._writer = pq.ParquetWriter(self.path + ".partial", MEMBER_SCHEMA, compression="zstd")

    def tee(self, partials):
        """Yield ``partials`` (of :func:`~worker.audit.aggregate.assignment_partials`), writing their members."""
        for table in partials:
            if table.num_rows:
                self._writer.write_table(cluster_members(table))
            yield table

    def close(self) -> None:
        self._writer.close()
        os.replace(self.path + ".partial", self.path)


#: the folder of a report's intervention pictures: :func:`intervention_picture` names each
PROBES = "interventions"


def intervention_picture(region: int, example: int, version: str) -> str:
    """The file, under :data:`PROBES`, of a probed region's example image as one of its versions (the original or
    a fill), with the region outlined."""
    return f"{region}-{example}-{version}.png"


def intervention_pictures(result) -> dict[str, np.ndarray]:
    """{:func:`intervention_picture`: the picture} of every probed region's examples (none without interventions):
    what the explorer shows of a row the audit probed."""
    out = {}
    for r, p in enumerate(result.interventions.regions if result.interventions else ()):
        for e, example in enumerate(p.examples):
            for name, version in example.versions.items():
                out[intervention_picture(r, e, name)] = _boxed(version.image, p.pixels, _scale(version.image))
    return out


def write_report(result, report_dir: str) -> None:
    """Write the report of ``result`` (an :class:`~worker.audit.result.AuditResult`) into ``report_dir``: audit.json,
    one Parquet file per table of :func:`tables`, the intervention pictures (:func:`intervention_pictures`) and
    report.html (:func:`render_html`)."""
    os.makedirs(report_dir, exist_ok=True)
    for name, table in tables(result).items():
        pq.write_table(table, os.path.join(report_dir, f"{name}.parquet"))
    pictures = intervention_pictures(result)
    if pictures:
        os.makedirs(os.path.join(report_dir, PROBES), exist_ok=True)
    for name, picture in pictures.items():
        with open(os.path.join(report_dir, PROBES, name), "wb") as f:
            f.write(png(picture))
    with open(os.path.join(report_dir, "audit.json"), "w") as f:
        f.write(result.to_json())
    with open(os.path.join(report_dir, "report.html"), "w") as f:
        f.write(render_html(result))


def render_html(result) -> str:
    """The report page of ``result``: :data:`~worker.audit.template.PAGE` rendered with :func:`view`."""
    return _environment().get_template("page").render(**view(result))


def _environment():
    import jinja2

    from worker.audit.template import PAGE

    env = jinja2.Environment(loader=jinja2.DictLoader({"page": PAGE}), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = lambda value, spec: format(value, spec)
    env.tests["finite"] = lambda value: value is not None and bool(np.isfinite(value))
    return env


def _figure(picture: np.ndarray, caption: str) -> dict:
    return {"png": png64(picture), "caption": caption}


def _scale(image: np.ndarray) -> int:
    """Pixels per input pixel so that an image is about 128 px wide."""
    return max(1, 128 // image.shape[1])


def _boxed(image: np.ndarray, box, scale: int) -> np.ndarray:
    """A uint8 RGB image, enlarged, with the pixel ``box`` (y0, x0, y1, x1) outlined."""
    return with_box(enlarge(image, scale), box, scale)


def view(result) -> dict:
    """What the template shows, from ``result``: plain values, the pictures as base64 PNGs."""
    names = result.names
    meta = result.metadata
    card = {"model fingerprint": meta.get("model", {}).get("fingerprint"), "method": meta.get("method"),
            "target": meta.get("target"), "score": meta.get("score"), "output": result.output, "rows": result.rows}
    classes, vmax, cmax = _classes_view(result)
    return {
        "output": result.output, "card": card, "fingerprint": str(card["model fingerprint"] or "")[:19],
        "contents": [("answer", "What the audit found"), ("classes", "Classes"), ("worst", "Worst cases"),
                     ("controls", "Controls"), ("methods", "Which map to trust"), ("interventions", "Interventions"),
                     ("clusters", "Clusters"), ("findings", "All findings"), ("run", "Run card")],
        "skipped": result.skipped, **_lead_view(result),
        "classes": classes, "vmax": vmax, "cmax": cmax, "class_images": bool(result.class_images),
        "worst": _worst_view(result), "worst_note": result.notes.get("worst_images", ""),
        "controls": result.controls, "controls_sentence": result.controls and controls_sentence(result.controls),
        "methods": _methods_view(result.method_comparison),
        "interventions": _interventions_view(result.interventions),
        "clusters": _clusters_view(result, vmax), "sample_size": SAMPLE_SIZE,
        "findings": [{"severity": f.severity, "group": f.group.title(names), "finding": f.finding,
                      "detail": f.detail} for f in result.findings],
    }


def _named(cls: int, names) -> str:
    return Group("true", cls).name(names)


def _lead_view(result) -> dict:
    """The page's first screen: the confirmed shortcuts with their pictures, or what was (not) found."""
    names = result.names
    section = result.interventions
    regions = section.regions if section else []
    confirmed = [p for p in regions if p.verdict == "confirmed" or p.shortcut]
    shown = []
    for p in confirmed:
        fills = p.probe["fills"]
        best = max(fills, key=lambda how: fills[how]["effect"])
        shown.append({"kind": "Shortcut confirmed" if p.verdict == "confirmed" else "Shortcut with the object",
                      "named": _named(p.cls, names), "cls": p.cls, "box": p.box, "area": p.probe["area"],
                      "where": "" if p.cluster is None else f" (on SpRAy cluster {p.cluster} of its maps)",
                      "best_fill": best, "best": fills[best], "sufficiency": p.probe["sufficiency"],
                      "panels": [_figure(picture, caption)
                                 for caption, picture in shortcut_panels(p, names, _scale(p.mean_image))]})
    rest = [p.verdict for p in regions if p not in confirmed]
    looks = [f for f in result.findings if f.verdict is None and f.severity == "high"]
    return {"confirmed": shown, "other_count": len(rest),
            "other_verdicts": ", ".join(f"{rest.count(v)} {v}" for v in dict.fromkeys(rest)),
            "looks": [f"{f.group.title(names)}: {f.finding}" for f in looks[:6]],
            "looks_more": max(0, len(looks) - 6)}


def _classes_view(result) -> tuple[list, float, float]:
    """Per class: its mean image, its mean map, and its contrast with the other classes (the mean map minus
    the other classes' mean), the maps on one colour scale, the contrasts on another; and the two scales."""
    from worker.audit.localise import contrast

    groups = result.groups
    kind = "true" if any(g.kind == "true" for g in groups) else "predicted"
    shown = {g: v for g, v in groups.items() if g.kind == kind and v.count}
    if not shown:
        return [], 1.0, 1.0
    contrasts = {g: np.clip(contrast(groups, g), 0, None) for g in shown}
    vmax = max(float(v.mean_map.max()) for v in shown.values())
    cmax = max(float(c.max()) for c in contrasts.values()) or 1.0
    out = []
    for g, v in shown.items():
        image = result.class_images.get(g.cls)
        figures = [_figure(enlarge(image, _scale(image)), "mean image")] if image is not None else []
        figures.append(_figure(heat(v.mean_map, 128, vmax), "mean map"))
        figures.append(_figure(heat(contrasts[g], 128, cmax), "contrast with the others"))
        if image is not None:
            figures.append(_figure(enlarge(overlay(image, v.mean_map, vmax), _scale(image)), "mean map on the image"))
        out.append({"title": g.title(result.names), "count": v.count, "figures": figures})
    return out, vmax, cmax


def _worst_view(result) -> list[dict]:
    """Per statistic, its worst rows: each image beside its map laid over it, or the map alone."""
    out = []
    for statistic, v in result.worst.items():
        cases = []
        for w in v.worst:
            caption = f"{w.id}: {w.value:.3g}"
            if w.image is None:
                cases.append([_figure(heat(w.grid, 128, float(w.grid.max())), caption)])
            else:
                scale = _scale(w.image)
                cases.append([_figure(enlarge(w.image, scale), caption),
                              _figure(enlarge(overlay(w.image, w.grid), scale), "its map on it")])
        out.append({"statistic": statistic, "direction": v.direction, "cases": cases})
    return out


def _clusters_view(result, vmax: float) -> list[dict]:
    """The groups that split into clusters: each cluster's mean map and its typical members (images beside their
    maps with interventions, else the sampled maps)."""
    def grid_figure(grid, caption, top=None):
        return _figure(heat(grid, 128, top if top is not None else float(grid.max())), caption)

    out = []
    for g, cs in result.clusters.items():
        if len(cs) < 2:
            continue
        shown = []
        for c in cs:
            if c.members:
                members = [[_figure(enlarge(m.image, _scale(m.image)), "typical member"),
                            _figure(enlarge(overlay(m.image, m.map), _scale(m.image)), "its map on it")]
                           for m in c.members]
            else:
                members = [[grid_figure(e, f"cluster {c.cluster}: typical member")] for e in c.examples]
            shown.append({"mean": grid_figure(c.mean_map, f"cluster {c.cluster}: {c.count} maps ({c.share:.0%}), "
                                                          "mean", vmax), "members": members})
        out.append({"title": g.title(result.names), "clusters": shown})
    return out


def _interventions_view(section) -> dict | None:
    """Each probed region: its pictures (the region on the mean image and on the mean map, the examples and
    their fills) and its numbers."""
    if section is None:
        return None
    regions = []
    for p in section.regions:
        box, scale = p.pixels, _scale(p.mean_image)
        who = f"class {p.cls}" + ("" if p.cluster is None else
                                  f", SpRAy cluster {p.cluster} ({p.probe['images']} of its sampled images)")
        examples = [[_figure(_boxed(overlay(e.versions["original"].image, e.map), box, scale), "image and its map")]
                    + [_figure(_boxed(v.image, box, scale), f"{name}: class {v.predicted}, logit {v.logit:.2f}")
                       for name, v in e.versions.items()] for e in p.examples]
        regions.append({"who": who, "verdict": p.verdict, "fills": p.probe["fills"],
                        "accuracy_before": p.probe["accuracy_before"], "sufficiency": p.probe["sufficiency"],
                        "figures": [_figure(_boxed(p.mean_image, box, scale), "mean image, region"),
                                    _figure(_boxed(overlay(p.mean_image, p.mean_map), box, scale), "mean map on it")],
                        "examples": examples})
    return {"images_per_class": section.images_per_class, "cost": section.cost, "seconds": section.seconds,
            "verdicts": section.verdicts(), "regions": regions}


SAME_CLASS = 0.8  # Spearman to a random class's (or a randomised model's) map above this: the maps hardly depend on it


def controls_sentence(controls) -> str:
    """What the :class:`~worker.audit.controls.Controls` say about this model's maps, in a sentence or two."""
    similar = controls.similarity_to_real
    out = []
    if not all(np.isfinite(v.spearman) for v in similar.values()):
        out.append("Constant maps have no rank order: a control with only such pairs has no Spearman.")
    if "random_class" in similar and np.isfinite(similar["random_class"].spearman):
        v = similar["random_class"].spearman
        out.append(f"The maps change little with the class asked about (Spearman {v:.2f} to a random class's map): "
                   "read them as where the model sees edges and objects, not as evidence for one class."
                   if v >= SAME_CLASS else
                   f"The maps depend on the class asked about (Spearman {v:.2f} to a random class's map): "
                   "they carry some class evidence.")
    if "randomized_model" in similar and np.isfinite(similar["randomized_model"].spearman):
        v = similar["randomized_model"].spearman
        out.append(f"A model with randomised weights gives much the same maps (Spearman {v:.2f}): they show the "
                   "image's structure more than what this model learnt."
                   if v >= SAME_CLASS else
                   f"Randomising the model's weights changes them (Spearman {v:.2f}): they depend on what this "
                   "model learnt.")
    out.append("Where the maps light up is not what the model relies on: only the interventions test that.")
    return " ".join(out)




def _methods_view(comparison) -> dict | None:
    """The comparison of methods (:mod:`worker.audit.compare`): its numbers, the methods compared and not, their
    colours, and the curves as inline SVG charts."""
    if comparison is None:
        return None
    section = comparison.summary
    done = {n: r for n, r in section["methods"].items() if "error" not in r}
    colours = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(done)}
    keys = [f"{mode}:{how}" for how in section["baselines"] for mode in ("deletion", "insertion")]
    first = next(iter(done.values()), None)
    floor = {k: [("random order", "#777", first["faithfulness"][k]["floor_curve"], True)] if first else []
             for k in keys}
    charts = [_svg_curves([(n, colours[n], r["faithfulness"][k]["curve"], False) for n, r in done.items()] + floor[k],
                          f"{k}: target logit", "share of pixels flipped, most relevant first") for k in keys]
    charts.append(_svg_curves([(n, colours[n], [1.0] + [p["mean"] for p in r["cascade"]], False)
                               for n, r in done.items() if r["cascade"]],
                              "cascading randomisation: Spearman", "layers re-initialised from the top"))
    return {"summary": section, "done": done, "colours": colours, "columns": keys, "first": first,
            "localised": any("localisation" in r for r in done.values()),
            "failed": [(n, r["error"]) for n, r in section["methods"].items() if "error" in r],
            "charts": [c for c in charts if c]}


DASHED = ' stroke-dasharray="4 3"'
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def _svg_curves(lines: list[tuple[str, str, list, bool]], title: str, x_label: str, width: int = 300,
                height: int = 190):
    """A small inline SVG chart: ``lines`` of (name, colour, y values at equal x steps on [0, 1], dashed), as
    markup the template inserts as it is (its text escaped here)."""
    from markupsafe import Markup, escape

    values = [v for _, _, ys, _ in lines for v in ys if np.isfinite(v)]
    if not values:
        return Markup("")
    low, high = min(values), max(values)
    high = high if high > low else low + 1
    left, top, right, bottom = 38, 18, width - 8, height - 28

    def xy(i, n, v):
        return (left + (right - left) * i / max(n - 1, 1), bottom - (bottom - top) * (v - low) / (high - low))

    paths = "".join(
        f'<polyline fill="none" stroke="{colour}" stroke-width="1.6"{DASHED if dashed else ""} '
        f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, len(ys), v) for i, v in enumerate(ys)))}">'
        f"<title>{escape(name)}</title></polyline>" for name, colour, ys, dashed in lines)
    return Markup(
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(title)}" style="font:10px sans-serif;margin:.2em .4em">'
            f'<text x="{left}" y="11" font-weight="bold">{escape(title)}</text>'
            f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>'
            f'<text x="{left - 3}" y="{top + 4}" text-anchor="end">{high:.3g}</text>'
            f'<text x="{left - 3}" y="{bottom}" text-anchor="end">{low:.3g}</text>'
            f'<text x="{(left + right) / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>'
            f"{paths}</svg>")
