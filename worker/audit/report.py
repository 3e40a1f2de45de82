"""The audit's report: its numbers as Arrow tables and Parquet files, audit.json, and one self-contained
HTML page (run card, findings, mean maps per class, worst cases, controls, clusters)."""

from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.audit.aggregate import GRID, SAMPLE_SIZE
from worker.audit.colormap import hot


def _png(grid: np.ndarray, vmax: float) -> str:
    from PIL import Image

    image = Image.fromarray(hot(grid, vmax)).resize((128, 128), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def aggregate_tables(result: dict) -> dict[str, pa.Table]:
    """The audit's numbers as Arrow tables: ``classes`` (one row per group: count, 16x16 mean and variance
    maps, mean/std of every statistic), ``clusters`` and ``findings``."""
    rows = []
    for group, v in result["groups"].items():
        if "count" not in v:
            continue
        kind, cls = group.split(":", 1)
        row = {"group": group, "kind": kind, "class": int(cls), "count": v["count"],
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
    clusters = pa.Table.from_pylist([{"group": g, "cluster": c["cluster"], "count": c["count"], "share": c["share"]}
                                     for g, cs in result.get("clusters", {}).items() for c in cs])
    keys = list(dict.fromkeys(k for f in result["findings"] for k in f))  # intervention findings add columns
    found = pa.Table.from_pylist([{k: f.get(k) for k in keys} for f in result["findings"]])
    return {"classes": classes, "clusters": clusters, "findings": found}


def _image_png(image: np.ndarray, box=None, scale: int = 4) -> str:
    """A uint8 RGB image, enlarged, with the pixel ``box`` (y0, x0, y1, x1) drawn in cyan."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(np.asarray(image, np.uint8)).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                                 Image.NEAREST)
    if box is not None:
        y0, x0, y1, x1 = box
        ImageDraw.Draw(picture).rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=(0, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _overlay(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    from PIL import Image

    heat = hot(np.asarray(Image.fromarray(np.asarray(saliency, np.float32)).resize(image.shape[1::-1], Image.BILINEAR)))
    return (0.45 * image + 0.55 * heat).astype(np.uint8)


def _interventions_html(section: dict | None) -> str:
    if not section:
        return "<h2>Interventions</h2><p>not run (audit --interventions N)</p>"

    def figure(png, caption):
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    parts = [f"<h2>Interventions</h2><p>Each class's regions (where its maps, or one SpRAy cluster's, concentrate "
             f"compared with the other classes) neutralised on {section['images_per_class']} of its images with three fills, against the "
             "same fills at random places, and pasted into other classes' images; a shortcut is confirmed when "
             "two fills beat random placement by a margin and the pasted region moves predictions to the class. "
             f"Cost: {html.escape(section['cost'])}; {section['seconds']} s in all.</p>"]
    for p in section["regions"]:
        verdict = p["verdict"]
        box = tuple(p["pixels"])
        rows = "".join(f"<tr><td>{how}</td><td>{f['flip_rate']:.0%}</td><td>{f['control_flip_rate']:.0%}</td>"
                       f"<td>{f['effect']:+.2f} [{f['interval'][0]:+.2f}, {f['interval'][1]:+.2f}]</td>"
                       f"<td>{f['accuracy_after']:.0%}</td></tr>" for how, f in p["fills"].items())
        who = f"class {p['class']}" + ("" if p.get("cluster") is None else
                                       f", SpRAy cluster {p['cluster']} ({p['images']} of its sampled images)")
        parts.append(f"<div class=\"intervention\"><h3>{who}: {verdict}</h3>"
                     + figure(_image_png(p["mean_image"], box), "mean image, region")
                     + figure(_image_png(_overlay(p["mean_image"], p["mean_map"]), box), "mean map on it")
                     + "".join(figure(_image_png(_overlay(e["versions"]["original"]["image"], e["map"]), box),
                                      "image and its map")
                               + "".join(figure(_image_png(v["image"], box),
                                                f"{name}: class {v['predicted']}, logit {v['logit']:.2f}")
                                         for name, v in e["versions"].items())
                               + "<br>" for e in p["examples"])
                     + "<table><tr><th>fill</th><th>flips</th><th>random place</th><th>effect [95 %]</th>"
                     f"<th>accuracy after</th></tr>{rows}</table><p>accuracy before {p['accuracy_before']:.0%}; "
                     f"pasted into other classes: {p['sufficiency']['moved_to_class']:.0%} move to the class "
                     f"(random box: {p['sufficiency']['control_moved']:.0%})</p></div>")
    return "".join(parts)


def _controls_html(controls: dict | None) -> str:
    if not controls:
        return "<h2>Controls</h2><p>not run (audit --controls N)</p>"
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{v['spearman']:.3f}</td><td>{v['ssim']:.3f}</td></tr>"
                   for name, v in controls["similarity_to_real"].items())
    return (f"<h2>Controls</h2><p>{controls['images']} images; extra cost: {html.escape(controls['extra_model_cost'])}. "
            "High similarity of the real maps to a control means the maps say little about the model or the class "
            "(guided backprop is known to reconstruct edges and to pass the model-randomisation test poorly).</p>"
            f"<table><tr><th>control</th><th>Spearman</th><th>SSIM</th></tr>{rows}</table>")


def write_report(result: dict, report_dir: str) -> None:
    """audit.json and classes/clusters/findings.parquet (numbers) and report.html (one self-contained page)."""
    os.makedirs(report_dir, exist_ok=True)
    groups = result["groups"]
    serial = {g: ({"count": v["count"], "mean_map": v["mean_map"].tolist(), "stats": v["stats"]} if "count" in v else
                  {"direction": v["direction"], "worst": [{"value": w["value"], "id": w["id"]} for w in v["worst"]]})
              for g, v in groups.items()}
    clusters = result.get("clusters", {})
    section = result.get("interventions")
    serial_interventions = section and {**section, "regions": [
        {k: v for k, v in p.items() if k not in ("examples", "mean_image", "mean_map")} for p in section["regions"]]}
    serial_clusters = {g: [{"cluster": c["cluster"], "count": c["count"], "share": c["share"],
                            "mean_map": c["mean_map"].tolist()} for c in cs] for g, cs in clusters.items()}
    for name, table in aggregate_tables(result).items():
        if table.num_columns:
            pq.write_table(table, os.path.join(report_dir, f"{name}.parquet"))
    with open(os.path.join(report_dir, "audit.json"), "w") as f:
        json.dump({"output": result["output"], "groups": serial, "clusters": serial_clusters,
                   "findings": result["findings"], "controls": result.get("controls"),
                   "interventions": serial_interventions}, f, indent=1)
    kind = "true:" if any(g.startswith("true:") for g in groups) else "predicted:"
    shown = {g: v for g, v in groups.items() if g.startswith(kind)}
    vmax = max((float(v["mean_map"].max()) for v in shown.values()), default=1.0)
    meta = result["metadata"]
    card = {"model fingerprint": meta.get("model", {}).get("fingerprint"), "method": meta.get("method"),
            "target": meta.get("target"), "score": meta.get("score"), "output": result["output"],
            "rows": sum(v["count"] for g, v in groups.items() if g.startswith("predicted:"))}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in card.items())
    tiles = "".join(
        f'<figure><img alt="{html.escape(g)}" src="data:image/png;base64,{_png(v["mean_map"], vmax)}">'
        f"<figcaption>{html.escape(g)} (n={v['count']})</figcaption></figure>" for g, v in shown.items())
    def figure(grid, caption, top=None):
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                f'{_png(grid, top if top is not None else float(grid.max()))}"><figcaption>{html.escape(caption)}'
                "</figcaption></figure>")

    cluster_rows = "".join(
        f"<div><h3>{html.escape(g)}: {len(cs)} cluster(s)</h3>" + "".join(
            figure(c["mean_map"], f"cluster {c['cluster']}: {c['count']} maps ({c['share']:.0%}), mean", vmax)
            + "".join(figure(e, f"cluster {c['cluster']}: typical member") for e in c.get("examples", []))
            + "<br>" for c in cs) + "</div>"
        for g, cs in clusters.items() if len(cs) > 1)
    def worst_case(w):
        caption = f"{w['id']}: {w['value']:.3g}"
        if "image" not in w:
            return figure(w["grid"], caption)
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                f'{_image_png(_overlay(w["image"], w["grid"]), scale=max(1, 128 // w["image"].shape[0]))}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    worst = "".join(
        f"<h3>{html.escape(g.split(':', 1)[1])} ({v['direction']}est)</h3>"
        + "".join(worst_case(w) for w in v["worst"]) for g, v in groups.items() if g.startswith("worst:"))
    found = "".join(f"<tr><td>{f['severity']}</td><td>{html.escape(f['group'])}</td><td>{f['finding']}</td>"
                    f"<td>{html.escape(f['detail'])}</td></tr>" for f in result["findings"]) or \
        "<tr><td colspan=4>no findings</td></tr>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Saliency audit</title>
<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:.5em;text-align:center}}
img{{image-rendering:pixelated;border:1px solid #ccc}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.intervention{{margin-bottom:1.5em}}</style></head><body>
<h1>Saliency audit</h1><h2>Run card</h2><table>{rows}</table>
<h2>Findings</h2><table><tr><th>severity</th><th>group</th><th>finding</th><th>detail</th></tr>{found}</table>
<h2>Mean maps per class</h2><p>L1-normalised maps averaged on a 16 x 16 grid, one colour scale for all
(max {vmax:.4f}).</p>{tiles}
<h2>Worst cases per statistic</h2><p>Each image with its map (16 x 16, on its own colour scale) laid over it;
the row id names it in the output. {html.escape(result.get("worst_images", ""))}</p>
{worst or "<p>no statistics columns in this output</p>"}
{_controls_html(result.get("controls"))}
{_interventions_html(result.get("interventions"))}
<h2>Clusters (spectral relevance analysis)</h2><p>Per class: a uniform sample of at most {SAMPLE_SIZE} maps is
clustered (kNN graph, normalised Laplacian, eigengap for k, k-means); every map is then assigned to its nearest
cluster. Classes with one cluster are not shown.</p>{cluster_rows or "<p>no class splits into clusters</p>"}
</body></html>"""
    with open(os.path.join(report_dir, "report.html"), "w") as f:
        f.write(page)
