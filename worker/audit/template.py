"""The report page's Jinja2 template (:data:`PAGE`), rendered by :func:`worker.audit.report.render_html` from the
view it builds of an :class:`~worker.audit.result.AuditResult`: every value escaped (autoescape), pictures as
base64 PNGs, numbers formatted with the ``fmt`` filter (a Python format spec: ``{{ share|fmt(".0%") }}``) and tested
with ``is finite``.

Examples:
    >>> import jinja2
    >>> jinja2.Environment().parse(PAGE) is not None  # it parses
    True
"""

PAGE = """\
{%- macro figure(f) -%}
<figure><img alt="{{ f.caption }}" src="data:image/png;base64,{{ f.png }}"><figcaption>{{ f.caption }}</figcaption></figure>
{%- endmacro -%}
{%- macro pair(p) -%}
<span class=pair>{{ figure(p[0]) }}{{ figure(p[1]) }}</span>
{%- endmacro -%}
{%- macro cell(s, digits=2) -%}
{%- if s and s.mean is finite -%}
{{ s.mean|fmt("." ~ digits ~ "f") }} <small>[{{ s.interval[0]|fmt("." ~ digits ~ "f") }}, {{ s.interval[1]|fmt("." ~ digits ~ "f") }}]</small>
{%- else -%}&ndash;{%- endif -%}
{%- endmacro -%}
<!doctype html><html><head><meta charset="utf-8"><title>Saliency audit</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;margin:0 auto;padding:.6em 1.2em;max-width:1400px;line-height:1.35}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.2em;margin:1.2em 0 .3em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:.6em 0 .2em}nav{margin:.3em 0;font-size:.95em}.sub{color:#555;margin:0}
figure{display:inline-block;margin:.2em .3em;text-align:center;vertical-align:top}
figcaption{font-size:.8em;max-width:130px;margin:auto}
img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
.lead{background:#fff6f0;border-left:4px solid #c33;padding:.2em .8em .4em;margin:.4em 0}.lead p{margin:.2em 0}
.skipped{background:#fffbe6;border-left:4px solid #d9a400;padding:.3em .8em;margin:.4em 0}
.answer{font-weight:600}.intervention{margin-bottom:1.5em}.pair{display:inline-block;margin-right:.6em}
.cls{display:inline-block;vertical-align:top;margin:0 1em .5em 0}</style></head><body>
<h1>Saliency audit</h1><p class=sub>{{ card.rows }} maps in {{ output }};
{{ card.method }},
target {{ card.target }}; model {{ fingerprint }}&hellip;</p>
<nav>{% for anchor, title in contents %}{% if not loop.first %} &middot; {% endif %}<a href=#{{ anchor }}>{{ title }}</a>{% endfor %}</nav>
{% if skipped %}<p class=skipped id=skipped><b>Model steps not run.</b> {{ skipped }}</p>
{% endif %}
<h2 id=answer>What the audit found</h2>
{%- for p in confirmed %}
<div class=lead><h3>{{ p.kind }}: class {{ p.named }} relies on a small region{{ p.where }}</h3>
<p>Neutralising the boxed region (rows {{ p.box[0]|fmt(".0%") }}-{{ p.box[2]|fmt(".0%") }}, columns {{ p.box[1]|fmt(".0%") }}-{{ p.box[3]|fmt(".0%") }}; {{ p.area|fmt(".1%") }} of the image) makes {{ p.best.flip_rate|fmt(".0%") }} of the class's correctly classified images leave it ({{ p.best_fill }} fill), against {{ p.best.control_flip_rate|fmt(".0%") }} for the same fill at random places; pasted into other classes' images it moves {{ p.sufficiency.moved_to_class|fmt(".0%") }} of them to class {{ p.cls }} (a random box of the class's images: {{ p.sufficiency.control_moved|fmt(".0%") }}).</p>
{%- for f in p.panels %}{{ figure(f) }}{% endfor %}</div>
{%- endfor %}
{%- if not interventions %}
<p class=answer>Interventions were not run ({% if skipped %}skipped: see above{% else %}audit --interventions N{% endif %}): the findings below say where the maps look, not what the model relies on.</p>
{%- elif not confirmed %}
<p class=answer>No shortcut confirmed by intervention ({{ interventions.verdicts }}).</p>
{%- elif other_verdicts %}
<p>The other {{ other_count }} regions probed: {{ other_verdicts }} (see Interventions).</p>
{%- endif %}
{%- if looks %}
<p>Where the maps look (not tested): {{ looks|join("; ") }}{% if looks_more %} and {{ looks_more }} more{% endif %} (<a href=#findings>all findings</a>).</p>
{%- endif %}
{%- if controls %}<p>{{ controls_sentence }}</p>{% endif %}

<h2 id=classes>Classes</h2>
{%- if not classes %}<p>no classes</p>
{%- else %}
<p>L1-normalised maps averaged on a 16 x 16 grid. <b>One colour scale for all mean maps</b> (white = {{ vmax|fmt(".4f") }}) and one for all contrasts (white = {{ cmax|fmt(".4f") }}: the class's mean map minus the other classes' mean, positive part), so classes compare by colour. A mean image is the mean of the first images of the class the audit read{% if not class_images %} (no mean images: the job's input could not be read, or has no labels){% endif %}.</p>
{%- for c in classes %}<div class=cls><h3>{{ c.title }} (n={{ c.count }})</h3>{% for f in c.figures %}{{ figure(f) }}{% endfor %}</div>{% endfor %}
{%- endif %}

<h2 id=worst>Worst cases per statistic</h2><p>Each image beside its map (16 x 16, on its own colour scale) laid
over it, at the input's resolution; the row id names it in the output. {{ worst_note }}</p>
{% for w in worst %}<h3>{{ w.statistic }} ({{ w.direction }}est)</h3>{% for case in w.cases %}{% if case|length == 2 %}{{ pair(case) }}{% else %}{{ figure(case[0]) }}{% endif %}{% endfor %}{% else %}<p>no statistics columns in this output</p>{% endfor %}

<h2 id=controls>Controls</h2>
{%- if not controls %}<p>{% if skipped %}skipped: the model was not run (see above){% else %}not run (audit --controls N){% endif %}</p>
{%- else %}<p class=answer>{{ controls_sentence }}</p>
<p>{{ controls.images }} images; extra cost: {{ controls.extra_model_cost }}. Similarity of the real maps to each control (guided backprop is known to reconstruct edges and to pass the model-randomisation test poorly: Adebayo et al. 2018).</p>
<table><tr><th>control</th><th>Spearman</th><th>SSIM</th></tr>
{%- for name, v in controls.similarity_to_real.items() %}<tr><td>{{ name }}</td><td>{{ v.spearman|fmt(".3f") }}</td><td>{{ v.ssim|fmt(".3f") }}</td></tr>{% endfor %}</table>
{%- endif %}

<h2 id=methods>Which map to trust</h2>
{%- if not methods %}<p>{% if skipped %}skipped: the model was not run (see above){% else %}not run (audit --compare-methods N){% endif %}</p>
{%- else %}{% set m = methods.summary %}<p class=answer>{{ m.sentence }}</p>
<p>{{ m.images }} images (a stratified sample, read and decoded as the job did), the job's model. Faithfulness (RISE deletion and insertion, Petsiuk et al. 2018): the target's logit as pixels are replaced by a baseline in the map's order, most relevant first, in {{ m.steps }} steps; baselines: blur (Gaussian, sigma {{ m.blur_sigma|fmt(".0%") }} of the side) and the sample's mean image. Deletion: a low area is good; insertion: a high one; the gain is the paired difference to the same curves along a random order (positive is better), with its 95 % bootstrap interval; a gain counts when its interval is above 0 and it is at least {{ m.min_gain|fmt(".1%") }} of the logit range ({{ m.logit_range|fmt(".3g") }}: the spread of the model's logits over the classes, mean over the sample). Sanity (Adebayo et al. 2018): Spearman of the map to the map of a random other class and of the model with its layers re-initialised from the top (low is good: the map depends on the class and on the weights), and under Gaussian noise of {{ m.noise_levels|fmt("g") }} levels (high is good). Cost: {{ m.cost.forward_per_image_per_method }} forward and {{ m.cost.explain_per_image_per_method }} explain passes per image per method (SmoothGrad: x {{ 1 + m.cost.smoothgrad_copies }} copies), {{ m.cost.floor_forward_per_image }} forward passes per image for the floor; {{ m.seconds }} s.</p>
<div style="overflow-x:auto"><table><tr><th>method</th>{% for k in methods.columns %}<th>{{ k }} AUC (gain over random)</th>{% endfor %}<th>Spearman to a random class's map</th><th>Spearman, all layers randomised</th><th>Spearman under noise</th>{% if methods.localised %}<th>energy in mask</th><th>relevance mass</th>{% endif %}<th>trusted</th><th>s</th></tr>
{%- for name, r in methods.done.items() %}<tr><td><span style="color:{{ methods.colours[name] }}">&#9632;</span> {{ name }}</td>
{%- for k in methods.columns %}<td>{{ r.faithfulness[k].auc.mean|fmt(".2f") }} ({{ cell(r.faithfulness[k].gain) }})</td>{% endfor -%}
<td>{{ cell(r.class_spearman) }}</td><td>{{ cell(r.cascade[-1] if r.cascade else None) }}</td><td>{{ cell(r.input_spearman) }}</td>
{%- if r.get("localisation") %}<td>{{ cell(r.localisation.energy_in_mask) }}</td><td>{{ cell(r.localisation.mass_accuracy) }}</td>{% endif -%}
<td>{{ "yes" if r.trusted else "no" }}</td><td>{{ r.seconds }}</td></tr>{% endfor %}
{%- if methods.first %}<tr><td>random order (floor)</td>{% for k in methods.columns %}<td>{{ methods.first.faithfulness[k].floor.mean|fmt(".2f") }}</td>{% endfor %}</tr>{% endif %}</table></div>
{%- if methods.failed %}<p>Not compared:</p><ul>{% for name, error in methods.failed %}<li>{{ name }}: {{ error }}</li>{% endfor %}</ul>{% endif %}
<div>{% for chart in methods.charts %}{{ chart }}{% endfor %}</div>
{%- endif %}

<h2 id=interventions>Interventions</h2>
{%- if not interventions %}<p>{% if skipped %}skipped: the model was not run (see above){% else %}not run (audit --interventions N){% endif %}</p>
{%- else %}<p>Each class's regions (where its maps, or one SpRAy cluster's, concentrate compared with the other classes) neutralised on {{ interventions.images_per_class }} of its images with three fills, against the same fills at random places, and pasted into other classes' images; a shortcut is confirmed when two fills beat random placement by a margin and the pasted region moves predictions to the class. Cost: {{ interventions.cost }}; {{ interventions.seconds }} s in all.</p>
{%- for p in interventions.regions %}
<div class="intervention"><h3>{{ p.who }}: {{ p.verdict }}</h3>{% for f in p.figures %}{{ figure(f) }}{% endfor %}
{%- for e in p.examples %}{% for f in e %}{{ figure(f) }}{% endfor %}<br>{% endfor -%}
<table><tr><th>fill</th><th>flips</th><th>random place</th><th>effect [95 %]</th><th>accuracy after</th></tr>
{%- for how, f in p.fills.items() %}<tr><td>{{ how }}</td><td>{{ f.flip_rate|fmt(".0%") }}</td><td>{{ f.control_flip_rate|fmt(".0%") }}</td><td>{{ f.effect|fmt("+.2f") }} [{{ f.interval[0]|fmt("+.2f") }}, {{ f.interval[1]|fmt("+.2f") }}]</td><td>{{ f.accuracy_after|fmt(".0%") }}</td></tr>{% endfor %}</table>
<p>accuracy before {{ p.accuracy_before|fmt(".0%") }}; pasted into other classes: {{ p.sufficiency.moved_to_class|fmt(".0%") }} move to the class (random box: {{ p.sufficiency.control_moved|fmt(".0%") }})</p></div>
{%- endfor %}
{%- endif %}

<h2 id=clusters>Clusters (spectral relevance analysis)</h2>
<p>Per class: a uniform sample of at most {{ sample_size }} maps is
clustered (kNN graph, normalised Laplacian, eigengap for k, k-means); every map is then assigned to its nearest
cluster. Mean maps on the mean maps' colour scale; typical members (nearest the centre) on their own: with
interventions, the class's sampled images beside their maps, else the sampled maps alone. Classes with one
cluster are not shown.</p>
{%- for g in clusters %}<div><h3>{{ g.title }}: {{ g.clusters|length }} cluster(s)</h3>
{%- for c in g.clusters %}{{ figure(c.mean) }}{% for m in c.members %}{% if m|length == 2 %}{{ pair(m) }}{% else %}{{ figure(m[0]) }}{% endif %}{% endfor %}<br>{% endfor %}</div>
{%- else %}<p>no class splits into clusters</p>{% endfor %}

<h2 id=findings>All findings</h2>
<table><tr><th>severity</th><th>group</th><th>finding</th><th>detail</th></tr>
{%- for f in findings %}<tr><td>{{ f.severity }}</td><td>{{ f.group }}</td><td>{{ f.finding }}</td><td>{{ f.detail }}</td></tr>
{%- else %}<tr><td colspan=4>no findings</td></tr>{% endfor %}</table>
<h2 id=run>Run card</h2><table>{% for k, v in card.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
</body></html>
"""
