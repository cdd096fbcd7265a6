"""The report's HTML: one self-describing page (its images are files beside it, linked relatively, so the report
dir can be moved or served as a whole). A small script marks images that fail to load and says how many."""
from __future__ import annotations

import json
from html import escape

# (key, label, format, higher is better?) of the before/after table, in this order, when present on both sides
TABLE_ROWS = [
    ("p_at_1", "retrieval P@1 among 100", "{:.3f}", True),
    ("wellformed", "well-formed (world grammar)", "{:.3f}", True),
    ("faithful", "faithful: every claim true", "{:.3f}", True),
    ("precision", "precision of claims", "{:.3f}", True),
    ("recall", "recall of the scene's attributes", "{:.3f}", True),
    ("bleu4", "BLEU-4 against the references", "{:.3f}", True),
    ("cider", "CIDEr against the references", "{:.3f}", True),
    ("clipscore", "CLIPScore", "{:.3f}", True),
    ("refcompare", "RefCompare: share of references below", "{:.3f}", True),
    ("multi_object", "names two or more objects", "{:.3f}", None),
    ("repetition", "repeats an object or trigram", "{:.3f}", False),
    ("mean_length", "mean length (words)", "{:.2f}", None),
    ("vocab_size", "vocabulary size", "{:d}", None),
    ("distinct_1", "distinct-1", "{:.3f}", True),
    ("distinct_2", "distinct-2", "{:.3f}", True),
    ("unique_caption_ratio", "unique captions", "{:.3f}", True),
    ("top_caption_share", "most frequent caption's share", "{:.3f}", False),
]

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #1d1f23; background: #f6f7f9; }
header { background: #23262d; color: #f1f2f4; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 2px 0; color: #c4c8cf; font-size: 14px; }
main { padding: 8px 32px 40px 32px; max-width: 1400px; }
h2 { font-size: 18px; margin: 28px 0 10px 0; }
.note { color: #59606b; font-size: 13px; max-width: 900px; }
table.metrics { border-collapse: collapse; background: white; font-size: 14px; }
table.metrics th, table.metrics td { padding: 6px 14px; border-bottom: 1px solid #e3e5e8; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
td.better { color: #13795b; font-weight: 600; } td.worse { color: #b3261e; font-weight: 600; }
.curves { display: flex; flex-wrap: wrap; gap: 12px; }
.curves figure { margin: 0; background: white; padding: 6px; border: 1px solid #e3e5e8; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 14px; }
.card { background: white; border: 1px solid #e3e5e8; border-radius: 6px; padding: 10px; display: flex; gap: 10px; }
.card img { width: 144px; height: auto; image-rendering: pixelated; flex: none; align-self: flex-start;
            border: 1px solid #d5d8dc; }
.card .text { font-size: 13px; min-width: 0; }
.card .id { color: #8a9099; font-size: 11px; }
.label { font-size: 11px; text-transform: uppercase; letter-spacing: 0.04em; color: #8a9099; margin-top: 6px; }
.caption { margin: 1px 0 0 0; }
.rank { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; background: #e8eaed; margin-left: 4px; }
.rank.first { background: #d4f0e4; color: #0c5c43; }
.w-false { color: #b3261e; text-decoration: line-through; text-decoration-thickness: 2px; font-weight: 600; }
.w-true { color: #13795b; }
.w-unparsed { color: #8d5a00; font-style: italic; }
.verdict { font-size: 11px; margin-left: 4px; }
.verdict.bad { color: #b3261e; } .verdict.good { color: #13795b; }
.refs { margin: 2px 0 0 0; padding-left: 16px; color: #3d434c; }
#broken { display: none; background: #fdecea; color: #8c1d18; padding: 10px 32px; font-weight: 600; }
pre { background: white; border: 1px solid #e3e5e8; padding: 10px; font-size: 12px; overflow-x: auto; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images), broken = 0;
  images.forEach(function (im) {
    var ok = im.complete && im.naturalWidth > 0;
    im.setAttribute('data-loaded', ok ? '1' : '0');
    if (!ok) { broken += 1; }
  });
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-broken', String(broken));
  if (broken) {
    var banner = document.getElementById('broken');
    banner.textContent = broken + ' of ' + images.length + ' images failed to load: the report dir was moved ' +
      'without its images/ folder and PNG files, or they were deleted (re-run python -m raycap.report RUN_DIR).';
    banner.style.display = 'block';
  }
});
"""


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return escape(str(value))


def metrics_table(before: dict, after: dict) -> str:
    rows = []
    for key, label, fmt, higher in TABLE_ROWS:
        a, b = before.get(key), after.get(key)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            continue
        delta = b - a
        cls = "" if higher is None or abs(delta) < 1e-12 else ("better" if (delta > 0) == higher else "worse")
        sign = "+" if delta > 0 else ""
        change = (f"{sign}{delta:d}" if isinstance(delta, int) else f"{sign}{delta:.3f}")
        rows.append(f"<tr><td>{escape(label)}</td><td>{_fmt(a, fmt)}</td><td>{_fmt(b, fmt)}</td>"
                    f"<td class=\"{cls}\">{change}</td></tr>")
    return ("<table class=\"metrics\"><thead><tr><th>metric</th><th>supervised</th><th>fine-tuned</th>"
            "<th>change</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def decodings_table(comparison) -> str:
    """The test table: each captioner with each decoding compared (`gallery.TestComparison.rows`), its headline
    metrics, and the fine-tuned rows' cut of P@1's error relative to the supervised captioner's greedy error."""
    from raycap.report.gallery import HEADLINE_KEYS, REFERENCE_KEYS, error_cut

    labels = {key: label for key, label, _, _ in TABLE_ROWS}
    keys = [k for k in HEADLINE_KEYS + REFERENCE_KEYS
            if all(isinstance(r.metrics.get(k), (int, float)) for r in comparison.rows)]
    head = "".join(f"<th>{escape(labels[k])}</th>" for k in keys)
    rows = []
    for r in comparison.rows:
        cut = error_cut(comparison.before.get("p_at_1"), r.metrics.get("p_at_1")) if r.captioner == "fine-tuned" \
            else None
        cells = "".join(f"<td>{_fmt(r.metrics[k], '{:.3f}')}</td>" for k in keys)
        rows.append(f"<tr><td>{escape(r.captioner)}</td><td>{escape(r.decoding)}</td>{cells}"
                    f"<td>{'-' if cut is None else f'{100 * cut:.1f}%'}</td></tr>")
    return ("<table class=\"metrics\" id=\"decodings\"><thead><tr><th>captioner</th><th>decoding</th>" + head +
            "<th>P@1 error cut</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def caption_html(view) -> str:
    if view.words is None:
        text = escape(view.text)
    else:
        text = " ".join(f"<span class=\"w-{v}\">{escape(w)}</span>" if v else escape(w) for w, v in view.words)
    rank = f"<span class=\"rank{' first' if view.rank == 1 else ''}\" title=\"rank of the target among 100 " \
           f"candidates\">rank {view.rank}</span>"
    verdict = ""
    if view.faithful is not None:
        verdict = ("<span class=\"verdict good\">faithful</span>" if view.faithful else
                   "<span class=\"verdict bad\">false claim</span>" if any(v == "false" for _, v in view.words) else
                   "<span class=\"verdict bad\">not faithful</span>")
    return f"<p class=\"caption\">{text or '<i>(empty)</i>'} {rank} {verdict}</p>"


def gallery_html(items) -> str:
    cards = []
    for item in items:
        parts = [f"<div class=\"id\">{escape(item.image_id)}</div>"]
        if item.truth is not None:
            parts.append(f"<div class=\"label\">scene</div><p class=\"caption\">{escape(item.truth)}</p>")
        for name, view in item.captions.items():
            parts.append(f"<div class=\"label\">{escape(name)}</div>{caption_html(view)}")
        if item.references:
            refs = "".join(f"<li>{escape(r)}</li>" for r in item.references)
            parts.append(f"<div class=\"label\">references</div><ul class=\"refs\">{refs}</ul>")
        cards.append(f"<div class=\"card\"><img src=\"{escape(item.image)}\" alt=\"test image "
                     f"{escape(item.image_id)}\"><div class=\"text\">{''.join(parts)}</div></div>")
    return "<div class=\"gallery\">" + "".join(cards) + "</div>"


def render(title: str, facts: list[str], comparison, curves: list[dict], config: dict, notes: list[str]) -> str:
    """The whole page. `comparison`: a gallery.TestComparison or None (a run without a final captioner)."""
    body = [f"<header><h1>{escape(title)}</h1>" + "".join(f"<p>{escape(f)}</p>" for f in facts) + "</header>",
            "<div id=\"broken\"></div><main>"]
    body += [f"<p class=\"note\">{escape(n)}</p>" for n in notes]
    if comparison is not None:
        body.append(f"<h2>Test split: what RL did and what the decoding did</h2><p class=\"note\">The first "
                    f"{comparison.n_images} test images, each captioner with each decoding (the run ships "
                    f"{escape(comparison.decoding)}); P@1 ranks each target among 100 candidates (itself + 99 random "
                    "test images, fixed seed); the error cut is relative to the supervised captioner's greedy "
                    "error.</p>")
        body.append(decodings_table(comparison))
        body.append("<h2>Test split: supervised (greedy) vs fine-tuned as shipped</h2>")
        body.append(metrics_table(comparison.before, comparison.after))
    if curves:
        figures = "".join(f"<figure><img src=\"{escape(c['file'])}\" alt=\"{escape(c['title'])}\" width=\"520\">"
                          "</figure>" for c in curves)
        body.append(f"<h2>Learning curves</h2><div class=\"curves\">{figures}</div>")
    if comparison is not None and comparison.items:
        world = comparison.items[0].truth is not None
        legend = (" Words the scene contradicts are <span class=\"w-false\">struck through</span>, true claims "
                  "are <span class=\"w-true\">green</span>, captions outside the grammar are "
                  "<span class=\"w-unparsed\">italic</span>." if world else "")
        body.append(f"<h2>Gallery: the first {len(comparison.items)} test images</h2><p class=\"note\">Each "
                    f"caption's rank is its target's among the same 100 candidates as P@1.{legend}</p>")
        body.append(gallery_html(comparison.items))
    body.append("<h2>Config</h2><details><summary>config.json</summary><pre>"
                f"{escape(json.dumps(config, indent=2))}</pre></details>")
    body.append("</main>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>" + "".join(body) + "</body></html>\n")
