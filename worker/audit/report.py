"""The audit's report: its numbers as Arrow tables and Parquet files, audit.json, and one self-contained
HTML page that leads with its answer (the confirmed shortcuts, with their pictures), then per class the mean
image, mean map and contrast, worst cases, controls, interventions, clusters, every finding and the run card.
Pictures: :mod:`worker.audit.pictures`."""

from __future__ import annotations

import html
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.audit.aggregate import GRID, SAMPLE_SIZE, Group, Worst
from worker.audit.pictures import enlarge, heat, overlay, png64, shortcut_panels, with_box


def aggregate_tables(result: dict) -> dict[str, pa.Table]:
    """The audit's numbers as Arrow tables: ``classes`` (one row per group: count, 16x16 mean and variance
    maps, mean/std of every statistic), ``clusters`` and ``findings``."""
    names = _class_names(result)
    rows = []
    for group, v in result["groups"].items():
        if not isinstance(group, Group):
            continue
        row = {**group.columns(names), "count": v["count"],
               "mean_map": v["mean_map"].astype(np.float32).reshape(-1).tolist(),
               "var_map": v["var_map"].astype(np.float32).reshape(-1).tolist()}
        for name, stat in v["stats"].items():
            row[f"{name}_mean"], row[f"{name}_std"] = stat["mean"], stat["std"]
        rows.append(row)
    classes = pa.Table.from_pylist(rows)
    grid_type = pa.fixed_shape_tensor(pa.float32(), [GRID, GRID])
    for name in ("mean_map", "var_map"):
        if classes.num_rows:
            storage = pa.array(classes[name].to_pylist(), pa.list_(pa.float32(), GRID * GRID))
            classes = classes.set_column(classes.schema.get_field_index(name), name,
                                         pa.ExtensionArray.from_storage(grid_type, storage))
    clusters = pa.Table.from_pylist([{**g.columns(names), "cluster": c["cluster"], "count": c["count"],
                                      "share": c["share"]} for g, cs in result.get("clusters", {}).items() for c in cs])
    keys = list(dict.fromkeys(k for f in result["findings"] for k in f))  # intervention findings add columns
    found = pa.Table.from_pylist([{k: f.get(k) for k in keys} for f in result["findings"]])
    return {"classes": classes, "clusters": clusters, "findings": found}


def _figure(picture: np.ndarray, caption: str, cls: str = "") -> str:
    alt = html.escape(caption)
    return (f'<figure{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}><img alt="{alt}" src="data:image/png;base64,'
            f'{png64(picture)}"><figcaption>{alt}</figcaption></figure>')


def _scale(image: np.ndarray) -> int:
    """Pixels per input pixel so that an image is about 128 px wide."""
    return max(1, 128 // image.shape[1])


def _image_png(image: np.ndarray, box=None, scale: int = 4) -> str:
    """A uint8 RGB image, enlarged, with the pixel ``box`` (y0, x0, y1, x1) outlined."""
    picture = enlarge(image, scale)
    return png64(picture if box is None else with_box(picture, box, scale))


def _interventions_html(section: dict | None) -> str:
    if not section:
        return "<h2 id=interventions>Interventions</h2><p>not run (audit --interventions N)</p>"

    def figure(png, caption):
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    parts = [f"<h2 id=interventions>Interventions</h2><p>Each class's regions (where its maps, or one SpRAy "
             f"cluster's, concentrate compared with the other classes) neutralised on {section['images_per_class']} "
             "of its images with three fills, against the same fills at random places, and pasted into other "
             "classes' images; a shortcut is confirmed when two fills beat random placement by a margin and the "
             "pasted region moves predictions to the class. "
             f"Cost: {html.escape(section['cost'])}; {section['seconds']} s in all.</p>"]
    for p in section["regions"]:
        verdict = p["verdict"]
        box = tuple(p["pixels"])
        scale = _scale(p["mean_image"])
        rows = "".join(f"<tr><td>{how}</td><td>{f['flip_rate']:.0%}</td><td>{f['control_flip_rate']:.0%}</td>"
                       f"<td>{f['effect']:+.2f} [{f['interval'][0]:+.2f}, {f['interval'][1]:+.2f}]</td>"
                       f"<td>{f['accuracy_after']:.0%}</td></tr>" for how, f in p["fills"].items())
        who = f"class {p['class']}" + ("" if p.get("cluster") is None else
                                       f", SpRAy cluster {p['cluster']} ({p['images']} of its sampled images)")
        parts.append(f"<div class=\"intervention\"><h3>{who}: {verdict}</h3>"
                     + figure(_image_png(p["mean_image"], box, scale), "mean image, region")
                     + figure(png64(with_box(enlarge(overlay(p["mean_image"], p["mean_map"]), scale), box, scale)),
                              "mean map on it")
                     + "".join(figure(_image_png(overlay(e["versions"]["original"]["image"], e["map"]), box, scale),
                                      "image and its map")
                               + "".join(figure(_image_png(v["image"], box, scale),
                                                f"{name}: class {v['predicted']}, logit {v['logit']:.2f}")
                                         for name, v in e["versions"].items())
                               + "<br>" for e in p["examples"])
                     + "<table><tr><th>fill</th><th>flips</th><th>random place</th><th>effect [95 %]</th>"
                     f"<th>accuracy after</th></tr>{rows}</table><p>accuracy before {p['accuracy_before']:.0%}; "
                     f"pasted into other classes: {p['sufficiency']['moved_to_class']:.0%} move to the class "
                     f"(random box: {p['sufficiency']['control_moved']:.0%})</p></div>")
    return "".join(parts)


SAME_CLASS = 0.8  # Spearman to a random class's (or a randomised model's) map above this: the maps hardly depend on it


def controls_sentence(controls: dict) -> str:
    """What the controls say about this model's maps, in a sentence or two."""
    similar = controls["similarity_to_real"]
    out = []
    if not all(np.isfinite(v["spearman"]) for v in similar.values()):
        out.append("Constant maps have no rank order: a control with only such pairs has no Spearman.")
    if "random_class" in similar and np.isfinite(similar["random_class"]["spearman"]):
        v = similar["random_class"]["spearman"]
        out.append(f"The maps change little with the class asked about (Spearman {v:.2f} to a random class's map): "
                   "read them as where the model sees edges and objects, not as evidence for one class."
                   if v >= SAME_CLASS else
                   f"The maps depend on the class asked about (Spearman {v:.2f} to a random class's map): "
                   "they carry some class evidence.")
    if "randomized_model" in similar and np.isfinite(similar["randomized_model"]["spearman"]):
        v = similar["randomized_model"]["spearman"]
        out.append(f"A model with randomised weights gives much the same maps (Spearman {v:.2f}): they show the "
                   "image's structure more than what this model learnt."
                   if v >= SAME_CLASS else
                   f"Randomising the model's weights changes them (Spearman {v:.2f}): they depend on what this "
                   "model learnt.")
    out.append("Where the maps light up is not what the model relies on: only the interventions test that.")
    return " ".join(out)


def _controls_html(controls: dict | None) -> str:
    if not controls:
        return "<h2 id=controls>Controls</h2><p>not run (audit --controls N)</p>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{v['spearman']:.3f}</td><td>{v['ssim']:.3f}</td></tr>"
                   for name, v in controls["similarity_to_real"].items())
    return (f"<h2 id=controls>Controls</h2><p class=answer>{html.escape(controls_sentence(controls))}</p>"
            f"<p>{controls['images']} images; extra cost: {html.escape(controls['extra_model_cost'])}. "
            "Similarity of the real maps to each control (guided backprop is known to reconstruct edges and to "
            "pass the model-randomisation test poorly: Adebayo et al. 2018).</p>"
            f"<table><tr><th>control</th><th>Spearman</th><th>SSIM</th></tr>{rows}</table>")


DASHED = ' stroke-dasharray="4 3"'
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def _comparison_json(section: dict | None) -> dict | None:
    """The method comparison for audit.json: its summaries (the per-image rows go to method_comparison.parquet)."""
    return section and {k: v for k, v in section.items() if k != "rows"}


def _svg_curves(lines: list[tuple[str, str, list, bool]], title: str, x_label: str, width: int = 300,
                height: int = 190) -> str:
    """A small inline SVG chart: ``lines`` of (name, colour, y values at equal x steps on [0, 1], dashed)."""
    values = [v for _, _, ys, _ in lines for v in ys if np.isfinite(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    high = high if high > low else low + 1
    left, top, right, bottom = 38, 18, width - 8, height - 28

    def xy(i, n, v):
        return (left + (right - left) * i / max(n - 1, 1), bottom - (bottom - top) * (v - low) / (high - low))

    paths = "".join(
        f'<polyline fill="none" stroke="{colour}" stroke-width="1.6"{DASHED if dashed else ""} '
        f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, len(ys), v) for i, v in enumerate(ys)))}">'
        f"<title>{html.escape(name)}</title></polyline>" for name, colour, ys, dashed in lines)
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(title)}" style="font:10px sans-serif;margin:.2em .4em">'
            f'<text x="{left}" y="11" font-weight="bold">{html.escape(title)}</text>'
            f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>'
            f'<text x="{left - 3}" y="{top + 4}" text-anchor="end">{high:.3g}</text>'
            f'<text x="{left - 3}" y="{bottom}" text-anchor="end">{low:.3g}</text>'
            f'<text x="{(left + right) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>'
            f"{paths}</svg>")


def _comparison_html(section: dict | None, report_dir: str) -> str:
    """The comparison of methods (:mod:`worker.audit.compare`): its sentence, the side-by-side table and the
    curves; writes its rows as method_comparison.parquet (one row per method, image and metric)."""
    if not section:
        return "<h2 id=methods>Which map to trust</h2><p>not run (audit --compare-methods N)</p>"
    pq.write_table(pa.Table.from_pylist(section["rows"]), os.path.join(report_dir, "method_comparison.parquet"))
    done = {n: r for n, r in section["methods"].items() if "error" not in r}
    colours = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(done)}
    keys = [f"{mode}:{how}" for how in section["baselines"] for mode in ("deletion", "insertion")]

    def cell(s, digits=2):
        return (f"{s['mean']:.{digits}f} <small>[{s['interval'][0]:.{digits}f}, {s['interval'][1]:.{digits}f}]</small>"
                if s and np.isfinite(s["mean"]) else "&ndash;")

    head = ("<tr><th>method</th>" + "".join(f"<th>{k} AUC (gain over random)</th>" for k in keys)
            + "<th>Spearman to a random class's map</th><th>Spearman, all layers randomised</th>"
            "<th>Spearman under noise</th>" + ("<th>energy in mask</th><th>relevance mass</th>"
                                               if any("localisation" in r for r in done.values()) else "")
            + "<th>trusted</th><th>s</th></tr>")
    rows = []
    for name, r in done.items():
        local = r.get("localisation")
        rows.append(f'<tr><td><span style="color:{colours[name]}">&#9632;</span> {html.escape(name)}</td>'
                    + "".join(f"<td>{r['faithfulness'][k]['auc']['mean']:.2f} ({cell(r['faithfulness'][k]['gain'])})"
                              "</td>" for k in keys)
                    + f"<td>{cell(r['class_spearman'])}</td><td>{cell(r['cascade'][-1] if r['cascade'] else None)}</td>"
                    + f"<td>{cell(r['input_spearman'])}</td>"
                    + (f"<td>{cell(local['energy_in_mask'])}</td><td>{cell(local['mass_accuracy'])}</td>"
                       if local else "")
                    + f"<td>{'yes' if r['trusted'] else 'no'}</td><td>{r['seconds']}</td></tr>")
    first = next(iter(done.values()), None)
    if first:
        rows.append("<tr><td>random order (floor)</td>" + "".join(
            f"<td>{first['faithfulness'][k]['floor']['mean']:.2f}</td>" for k in keys) + "</tr>")
    failed = "".join(f"<li>{html.escape(n)}: {html.escape(r['error'])}</li>" for n, r in section["methods"].items()
                     if "error" in r)
    charts = "".join(
        _svg_curves([(n, colours[n], r["faithfulness"][k]["curve"], False) for n, r in done.items()]
                    + ([("random order", "#777", first["faithfulness"][k]["floor_curve"], True)] if first else []),
                    f"{k}: target logit", "share of pixels flipped, most relevant first")
        for k in keys)
    charts += _svg_curves([(n, colours[n], [1.0] + [p["mean"] for p in r["cascade"]], False)
                           for n, r in done.items() if r["cascade"]],
                          "cascading randomisation: Spearman", "layers re-initialised from the top")
    cost = section["cost"]
    return (f"<h2 id=methods>Which map to trust</h2><p class=answer>{html.escape(section['sentence'])}</p>"
            f"<p>{section['images']} images (a stratified sample, read and decoded as the job did), the job's model. "
            "Faithfulness (RISE deletion and insertion, Petsiuk et al. 2018): the target's logit as pixels are "
            f"replaced by a baseline in the map's order, most relevant first, in {section['steps']} steps; baselines: "
            f"blur (Gaussian, sigma {section['blur_sigma']:.0%} of the side) and the sample's mean image. Deletion: a "
            "low area is good; insertion: a high one; the gain is the paired difference to the same curves along a "
            "random order (positive is better), with its 95 % bootstrap interval; a gain counts when its interval "
            f"is above 0 and it is at least {section['min_gain']:.1%} of the logit range ({section['logit_range']:.3g}: "
            "the spread of the model's logits over the classes, mean over the sample). Sanity (Adebayo et al. 2018): "
            "Spearman of the map to the map of a random other class and of the model with its layers "
            "re-initialised from the top (low is good: the map depends on the class and on the weights), and "
            f"under Gaussian noise of {section['noise_levels']:g} levels (high is good). Cost: "
            f"{cost['forward_per_image_per_method']} forward and {cost['explain_per_image_per_method']} explain "
            f"passes per image per method (SmoothGrad: x {1 + cost['smoothgrad_copies']} copies), "
            f"{cost['floor_forward_per_image']} forward passes per image for the floor; {section['seconds']} s.</p>"
            f"<div style=\"overflow-x:auto\"><table>{head}{''.join(rows)}</table></div>"
            + (f"<p>Not compared:</p><ul>{failed}</ul>" if failed else "")
            + f"<div>{charts}</div>")


def _class_names(result: dict) -> list | None:
    """The classes' names, when the job recorded them (``JobConfig(extra_metadata={"class_names": [...]})``)."""
    names = result["metadata"].get("class_names")
    return names if isinstance(names, list) and names else None


def _named(cls: int, names) -> str:
    return "class " + Group("true", cls).name(names)


def _lead_html(result: dict) -> str:
    """The page's first screen: the confirmed shortcuts with their pictures, or what was (not) found."""
    section = result.get("interventions")
    names = _class_names(result)
    parts = ["<h2 id=answer>What the audit found</h2>"]
    confirmed = [p for p in (section or {}).get("regions", []) if p["verdict"] == "confirmed" or p.get("shortcut")]
    for p in confirmed:
        y0, x0, y1, x1 = p["box"]
        fills = p["fills"]
        best = max(fills, key=lambda how: fills[how]["effect"])
        where = "" if p.get("cluster") is None else f" (on SpRAy cluster {p['cluster']} of its maps)"
        kind = "Shortcut confirmed" if p["verdict"] == "confirmed" else "Shortcut with the object"
        parts.append(
            f"<div class=lead><h3>{kind}: {html.escape(_named(p['class'], names))} relies on a small region{where}</h3>"
            f"<p>Neutralising the boxed region (rows {y0:.0%}-{y1:.0%}, columns {x0:.0%}-{x1:.0%}; "
            f"{p['area']:.1%} of the image) makes {fills[best]['flip_rate']:.0%} of the class's correctly "
            f"classified images leave it ({best} fill), against {fills[best]['control_flip_rate']:.0%} for the "
            f"same fill at random places; pasted into other classes' images it moves "
            f"{p['sufficiency']['moved_to_class']:.0%} of them to class {p['class']} "
            f"(a random box of the class's images: {p['sufficiency']['control_moved']:.0%}).</p>"
            + "".join(_figure(picture, caption)
                      for caption, picture in shortcut_panels(p, names, _scale(p["mean_image"])))
            + "</div>")
    if section is None:
        parts.append("<p class=answer>Interventions were not run (audit --interventions N): the findings below say "
                     "where the maps look, not what the model relies on.</p>")
    elif not confirmed:
        verdicts = [p["verdict"] for p in section["regions"]]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) or "no region to probe"
        parts.append(f"<p class=answer>No shortcut confirmed by intervention ({counts}).</p>")
    elif len(section["regions"]) > len(confirmed):
        rest = [p["verdict"] for p in section["regions"] if p not in confirmed]
        parts.append(f"<p>The other {len(rest)} regions probed: "
                     + ", ".join(f"{rest.count(v)} {v}" for v in dict.fromkeys(rest)) + " (see Interventions).</p>")
    others = [f for f in result["findings"] if f.get("verdict") is None and f["severity"] == "high"]
    if others:
        parts.append("<p>Where the maps look (not tested): " + "; ".join(
            f"{html.escape(Group.of(f).title(names))}: {html.escape(f['finding'])}" for f in others[:6])
            + (f" and {len(others) - 6} more" if len(others) > 6 else "")
            + " (<a href=#findings>all findings</a>).</p>")
    if result.get("controls"):
        parts.append(f"<p>{html.escape(controls_sentence(result['controls']))}</p>")
    return "".join(parts)


def _classes_html(groups: dict, kind: str, class_images: dict, names=None) -> str:
    """Per class: its mean image, its mean map, and its contrast with the other classes (the mean map minus
    the other classes' mean), the maps on one colour scale, the contrasts on another."""
    from worker.audit.localise import contrast

    shown = {g: v for g, v in groups.items() if isinstance(g, Group) and g.kind == kind and v.get("count")}
    if not shown:
        return "<p>no classes</p>"
    contrasts = {g: np.clip(contrast(groups, g), 0, None) for g in shown}
    vmax = max(float(v["mean_map"].max()) for v in shown.values())
    cmax = max(float(c.max()) for c in contrasts.values()) or 1.0
    rows = []
    for g, v in shown.items():
        image = class_images.get(g.cls)
        cells = [_figure(enlarge(image, _scale(image)), "mean image") if image is not None else ""]
        cells.append(_figure(heat(v["mean_map"], 128, vmax), "mean map"))
        cells.append(_figure(heat(contrasts[g], 128, cmax), "contrast with the others"))
        if image is not None:
            cells.append(_figure(enlarge(overlay(image, v["mean_map"], vmax), _scale(image)), "mean map on the image"))
        title = g.title(names)
        rows.append(f"<div class=cls><h3>{html.escape(title)} (n={v['count']})</h3>{''.join(cells)}</div>")
    note = "" if class_images else " (no mean images: the job's input could not be read, or has no labels)"
    return (f"<p>L1-normalised maps averaged on a 16 x 16 grid. <b>One colour scale for all mean maps</b> (white = "
            f"{vmax:.4f}) and one for all contrasts (white = {cmax:.4f}: the class's mean map minus the other "
            "classes' mean, positive part), so classes compare by colour. A mean image is the mean of the first "
            f"images of the class the audit read{note}.</p>" + "".join(rows))


def write_report(result: dict, report_dir: str) -> None:
    """audit.json and classes/clusters/findings.parquet (numbers) and report.html (one self-contained page)."""
    os.makedirs(report_dir, exist_ok=True)
    groups = result["groups"]
    names = _class_names(result)
    serial = [{**g.columns(names), "count": v["count"], "mean_map": v["mean_map"].tolist(), "stats": v["stats"]}
              for g, v in groups.items() if isinstance(g, Group)]
    serial_worst = {g.statistic: {"direction": v["direction"],
                                  "worst": [{"value": w["value"], "id": w["id"]} for w in v["worst"]]}
                    for g, v in groups.items() if isinstance(g, Worst)}
    clusters = result.get("clusters", {})
    section = result.get("interventions")
    serial_interventions = section and {**section, "regions": [
        {k: v for k, v in p.items() if k not in ("examples", "mean_image", "mean_map")} for p in section["regions"]]}
    serial_clusters = [{**g.columns(names), "clusters": [{"cluster": c["cluster"], "count": c["count"],
                                                          "share": c["share"], "mean_map": c["mean_map"].tolist()}
                                                         for c in cs]} for g, cs in clusters.items()]
    for name, table in aggregate_tables(result).items():
        if table.num_columns:
            pq.write_table(table, os.path.join(report_dir, f"{name}.parquet"))
    with open(os.path.join(report_dir, "audit.json"), "w") as f:
        json.dump({"output": result["output"], "groups": serial, "worst": serial_worst, "clusters": serial_clusters,
                   "findings": result["findings"], "controls": result.get("controls"),
                   "interventions": serial_interventions,
                   "method_comparison": _comparison_json(result.get("method_comparison"))}, f, indent=1)
    kind = "true" if any(isinstance(g, Group) and g.kind == "true" for g in groups) else "predicted"
    shown = {g: v for g, v in groups.items() if isinstance(g, Group) and g.kind == kind}
    vmax = max((float(v["mean_map"].max()) for v in shown.values()), default=1.0)
    meta = result["metadata"]
    card = {"model fingerprint": meta.get("model", {}).get("fingerprint"), "method": meta.get("method"),
            "target": meta.get("target"), "score": meta.get("score"), "output": result["output"],
            "rows": sum(v["count"] for g, v in groups.items() if isinstance(g, Group) and g.kind == "predicted")}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in card.items())

    def grid_figure(grid, caption, top=None):
        return _figure(heat(grid, 128, top if top is not None else float(grid.max())), caption)

    cluster_rows = "".join(
        f"<div><h3>{html.escape(g.title(names))}: {len(cs)} cluster(s)</h3>" + "".join(
            grid_figure(c["mean_map"], f"cluster {c['cluster']}: {c['count']} maps ({c['share']:.0%}), mean", vmax)
            + ("".join(f"<span class=pair>{_figure(enlarge(m['image'], _scale(m['image'])), 'typical member')}"
                       f"{_figure(enlarge(overlay(m['image'], m['map']), _scale(m['image'])), 'its map on it')}</span>"
                       for m in c["members"]) if c.get("members") else
               "".join(grid_figure(e, f"cluster {c['cluster']}: typical member") for e in c.get("examples", [])))
            + "<br>" for c in cs) + "</div>"
        for g, cs in clusters.items() if len(cs) > 1)

    def worst_case(w):
        caption = f"{w['id']}: {w['value']:.3g}"
        if "image" not in w:
            return grid_figure(w["grid"], caption)
        scale = _scale(w["image"])
        return (f"<span class=pair>{_figure(enlarge(w['image'], scale), caption)}"
                f"{_figure(enlarge(overlay(w['image'], w['grid']), scale), 'its map on it')}</span>")

    worst = "".join(
        f"<h3>{html.escape(g.statistic)} ({v['direction']}est)</h3>"
        + "".join(worst_case(w) for w in v["worst"]) for g, v in groups.items() if isinstance(g, Worst))
    found = "".join(f"<tr><td>{f['severity']}</td><td>{html.escape(Group.of(f).title(names))}</td>"
                    f"<td>{f['finding']}</td>"
                    f"<td>{html.escape(f['detail'])}</td></tr>" for f in result["findings"]) or \
        "<tr><td colspan=4>no findings</td></tr>"
    fingerprint = str(card["model fingerprint"] or "")
    contents = [("answer", "What the audit found"), ("classes", "Classes"), ("worst", "Worst cases"),
                ("controls", "Controls"), ("methods", "Which map to trust"), ("interventions", "Interventions"),
                ("clusters", "Clusters"),
                ("findings", "All findings"), ("run", "Run card")]
    toc = " &middot; ".join(f"<a href=#{a}>{t}</a>" for a, t in contents)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Saliency audit</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;margin:0 auto;padding:.6em 1.2em;max-width:1400px;line-height:1.35}}
h1{{font-size:1.4em;margin:.2em 0}}h2{{font-size:1.2em;margin:1.2em 0 .3em;border-bottom:1px solid #ddd}}
h3{{font-size:1em;margin:.6em 0 .2em}}nav{{margin:.3em 0;font-size:.95em}}.sub{{color:#555;margin:0}}
figure{{display:inline-block;margin:.2em .3em;text-align:center;vertical-align:top}}
figcaption{{font-size:.8em;max-width:130px;margin:auto}}
img{{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}}table{{border-collapse:collapse;font-size:.9em}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}}
.lead{{background:#fff6f0;border-left:4px solid #c33;padding:.2em .8em .4em;margin:.4em 0}}.lead p{{margin:.2em 0}}
.answer{{font-weight:600}}.intervention{{margin-bottom:1.5em}}.pair{{display:inline-block;margin-right:.6em}}
.cls{{display:inline-block;vertical-align:top;margin:0 1em .5em 0}}</style></head><body>
<h1>Saliency audit</h1><p class=sub>{card["rows"]} maps in {html.escape(result["output"])};
{html.escape(str(card["method"]))},
target {html.escape(str(card["target"]))}; model {html.escape(fingerprint[:19])}&hellip;</p>
<nav>{toc}</nav>
{_lead_html(result)}
<h2 id=classes>Classes</h2>{_classes_html(groups, kind, result.get("class_images", {}), names)}
<h2 id=worst>Worst cases per statistic</h2><p>Each image beside its map (16 x 16, on its own colour scale) laid
over it, at the input's resolution; the row id names it in the output. {html.escape(result.get("worst_images", ""))}</p>
{worst or "<p>no statistics columns in this output</p>"}
{_controls_html(result.get("controls"))}
{_comparison_html(result.get("method_comparison"), report_dir)}
{_interventions_html(result.get("interventions"))}
<h2 id=clusters>Clusters (spectral relevance analysis)</h2>
<p>Per class: a uniform sample of at most {SAMPLE_SIZE} maps is
clustered (kNN graph, normalised Laplacian, eigengap for k, k-means); every map is then assigned to its nearest
cluster. Mean maps on the mean maps' colour scale; typical members (nearest the centre) on their own: with
interventions, the class's sampled images beside their maps, else the sampled maps alone. Classes with one
cluster are not shown.</p>{cluster_rows or "<p>no class splits into clusters</p>"}
<h2 id=findings>All findings</h2>
<table><tr><th>severity</th><th>group</th><th>finding</th><th>detail</th></tr>{found}</table>
<h2 id=run>Run card</h2><table>{rows}</table>
</body></html>"""
    with open(os.path.join(report_dir, "report.html"), "w") as f:
        f.write(page)
