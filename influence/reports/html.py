"""A self-contained HTML report a person reads first (no scripts, no external assets)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence

SIGNS = (
    "A score estimates how much worse the query's measurement (its loss, or its margin reversed) "
    "would become if that training example were removed and the model retrained. "
    "<b>Positive = proponent</b>: the example helped the model's answer on this query. "
    "<b>Negative = opponent</b>: the example pushed against it. Influence-function and multi-stage "
    "scores are in units of the measurement (they include 1/n); TracIn-WE scores are sums over "
    "checkpoints of learning rate × gradient dot products and are comparable only among themselves."
)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px;width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0} .num{text-align:right;font-family:monospace}
.pass{color:#0a0;font-weight:bold} .fail{color:#c00;font-weight:bold}
.query{border-left:4px solid #36c;padding-left:1em;margin:2em 0}
.w{padding:0 2px;border-radius:3px} details{margin:.3em 0} code{background:#f4f4f4}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ddd} figcaption{font-size:13px;color:#555}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(c.removesuffix('_html'))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4g}</td>')
            else:
                cells.append(f"<td>{v if str(c).endswith('_html') else _e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def highlight_words(text: str, terms: Mapping[str, float]) -> str:
    """HTML of ``text`` with each word that has a term shaded by it (green +, red −)."""
    if not terms:
        return _e(text)
    scale = max(abs(v) for v in terms.values()) or 1.0
    out = []
    for token in re.split(r"(\W+)", text):
        v = terms.get(token.lower())
        if v is None or not token.strip():
            out.append(_e(token))
            continue
        alpha = min(1.0, abs(v) / scale) * 0.8 + 0.1
        color = f"rgba(0,160,0,{alpha:.2f})" if v > 0 else f"rgba(220,0,0,{alpha:.2f})"
        out.append(f'<span class="w" style="background:{color}" title="{v:.3g}">{_e(token)}</span>')
    return "".join(out)


def render_report(report: Mapping[str, object]) -> str:
    """Render the pipeline report.

    Args:
        report: a dict with keys ``title``; ``summary`` (``{name: value}``); ``data_versions``
            (``{dataset: hash}``); ``settings`` (``{name: value}``); ``deletion`` (a list of rows with
            keys data, method, mode, removed, k, mean_top, mean_random, difference, interval_95, probability_top, probability_random, passed); ``queries``: a list of dicts with
            ``id, text, label, prediction`` and ``sections``: lists of ``{"title", "rows"}`` where rows
            hold ``kind, rank, id, text or text_html, label, score``; optional ``figures``: a list of
            ``{"title", "caption", "png"}`` (``png``: the image's bytes, embedded as a data URI so the
            page stays one file); optional ``evaluation``: a list of ``{"title", "text", "rows",
            "columns"}`` sections (LDS, mislabel detection).

    Returns:
        The HTML page as a string.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(report['title'])}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{_e(report['title'])}</h1>"]
    parts.append(f"<h2>How to read the scores</h2><p>{SIGNS}</p>")
    summary = report.get("summary", {})
    parts.append("<h2>Run</h2>" + _table([{"name": k, "value": v} for k, v in summary.items()], ["name", "value"]))
    versions = report.get("data_versions", {})
    parts.append("<h2>Data versions (DVC md5)</h2>" + _table([{"dataset": k, "md5": v} for k, v in versions.items()], ["dataset", "md5"]))
    deletion = report.get("deletion", [])
    if deletion:
        rows = []
        for d in deletion:
            verdict = '<span class="pass">pass</span>' if d["passed"] else '<span class="fail">fail</span>'
            rows.append({**d, "verdict_html": verdict})
        parts.append(
            "<h2>Case-deletion check</h2><p>For each query its k top proponents (or opponents) were removed "
            "and the model retrained (finetuning data: the finetuning stage re-run; pretraining data: "
            "pretraining and finetuning re-run); the change of the query's loss (<i>mean_top</i>, averaged over queries) "
            "is compared with removing k random examples (<i>mean_random</i>). <i>difference</i> is the mean "
            "per-query excess over random, with its 95% Student-t interval over queries. Removing proponents "
            "passes when the interval lies above zero; removing opponents when it lies below zero. A failed "
            "row means the method's ranking is not borne out by retraining at that k. <i>probability_top</i> and "
            "<i>probability_random</i> are the mean changes of the probability the model gives the query's label.</p>"
            + _table(rows, ["data", "method", "mode", "removed", "k", "mean_top", "mean_random", "difference", "interval_95",
                            "probability_top", "probability_random", "verdict_html"])
        )
    for section in report.get("evaluation", []):
        parts.append(f"<h2>{_e(section['title'])}</h2><p>{_e(section.get('text', ''))}</p>")
        if section.get("rows"):
            parts.append(_table(section["rows"], section["columns"]))
    for fig in report.get("figures", []):
        data = base64.b64encode(fig["png"]).decode("ascii")
        parts.append(f"<figure><figcaption><b>{_e(fig['title'])}</b>. {_e(fig.get('caption', ''))}</figcaption>"
                     f"<img alt='{_e(fig['title'])}' src='data:image/png;base64,{data}'></figure>")
    for q in report.get("queries", []):
        parts.append(f"<div class='query'><h2>Query {_e(q['id'])}</h2><p><i>{_e(q['text'])}</i></p>"
                     f"<p>label: <b>{_e(q['label'])}</b>, prediction: <b>{_e(q['prediction'])}</b></p>")
        for section in q.get("sections", []):
            rows = [dict(r, text_html=r.get("text_html") or _e(r.get("text", ""))) for r in section["rows"]]
            parts.append(f"<h3>{_e(section['title'])}</h3>" + _table(rows, ["kind", "rank", "id", "text_html", "label", "score"]))
        parts.append("</div>")
    settings = report.get("settings", {})
    parts.append("<h2>Settings</h2><details><summary>all settings</summary>"
                 + _table([{"setting": k, "value": v} for k, v in settings.items()], ["setting", "value"]) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
