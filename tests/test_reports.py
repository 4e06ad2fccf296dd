"""Ranked tables and the HTML report."""

from __future__ import annotations

import numpy as np
import torch

from influence.reports.html import highlight_words, render_report
from influence.reports.tables import COLUMNS, join_examples, ranked_rows


def test_ranked_rows_orders_proponents_and_opponents():
    scores = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-0.1, 0.3, 0.2, -3.0]])
    rows = ranked_rows(scores, ["q0", "q1"], ["a", "b", "c", "d"], k=2, source="finetuning", method="if", mode="fixed")
    q0 = [r for r in rows if r["query_id"] == "q0"]
    assert [r["id"] for r in q0 if r["kind"] == "proponent"] == ["c", "a"]
    assert [r["id"] for r in q0 if r["kind"] == "opponent"] == ["b", "d"]
    assert [r["rank"] for r in q0 if r["kind"] == "opponent"] == [1, 2]
    joined = join_examples(rows, {"c": {"text": "great film", "label": "fresh"}}, {"q0": {"text": "q", "label": "fresh", "prediction": "fresh"}})
    assert list(joined[0]) == list(COLUMNS) and joined[0]["text"] == "great film"


def test_html_report_has_every_query_and_escapes_text():
    report = {
        "title": "t", "summary": {"accuracy": 0.8}, "data_versions": {"finetune": "abc"}, "settings": {"seed": 0},
        "deletion": [{"method": "if", "mode": "fixed", "removed": "proponents", "k": "5 (1.0%)", "mean_top": 0.2,
                      "mean_random": 0.01, "difference": 0.19, "interval_95": "[0.1, 0.3]", "passed": True}],
        "queries": [{"id": f"q{i}", "text": "<b>x</b>", "label": "fresh", "prediction": "fresh",
                     "sections": [{"title": "IF", "rows": [{"kind": "proponent", "rank": 1, "id": "z", "text": "y", "label": "rotten", "score": 0.5}]}]}
                    for i in range(3)],
    }
    page = render_report(report)
    assert all(f"Query q{i}" in page for i in range(3))
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "Case-deletion check" in page and "pass" in page and "abc" in page


def test_highlight_words_shades_only_scored_words():
    html = highlight_words("A great, great movie", {"great": 0.5, "movie": -0.1})
    assert html.count("rgba(0,160,0") == 2 and html.count("rgba(220,0,0") == 1
    assert highlight_words("plain <text>", {}) == "plain &lt;text&gt;"


def test_figure_sample_is_bounded_and_pairs_matrices_of_one_shape(monkeypatch):
    import flows.stages.report as report

    small = torch.arange(12.0).reshape(3, 4)
    assert report.figure_sample(small).tolist() == list(range(12))
    monkeypatch.setattr(report, "FIGURE_SAMPLE", 50)
    big = torch.randn(30, 40)
    first, second = report.figure_sample(big), report.figure_sample(2 * big)
    assert first.shape == (50,) and first.dtype == np.float64
    np.testing.assert_array_equal(second, 2 * first)  # the same (query, example) positions
    assert set(first.tolist()) <= set(big.double().reshape(-1).tolist())


def test_dataset_text_is_inert_in_the_markdown_summary_and_in_csv_cells(tmp_path):
    """A review can hold markdown, HTML or a spreadsheet formula: the Prefect summary shows it as text, and the
    CSV tables prefix a formula-like cell with an apostrophe (numbers, negative scores included, stay numbers)."""
    import csv

    from flows.reporting.prefect_artifacts import markdown_text
    from flows.stages.report import _write_csv, spreadsheet_safe
    from influence.reports.tables import COLUMNS

    shown = markdown_text("Great <img src=x onerror=alert(1)> [click](http://evil.example) ![i](http://t.example/p.png) | x |")
    for raw in ("<img", "[click](", "![i](", "| x |"):
        assert raw not in shown
    assert shown.startswith("Great &lt;img") and "\\[click\\]\\(http://evil\\.example\\)" in shown
    assert markdown_text("a\nb\n\n# heading") == "a b \\# heading"
    for value, safe in (("=HYPERLINK(\"http://evil.example\")", "'=HYPERLINK(\"http://evil.example\")"),
                        ("@SUM(A1:A9)", "'@SUM(A1:A9)"), ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
                        ("-great film", "'-great film"), ("\t=1", "'\t=1"), ("-0.25", "-0.25"), ("+3e-2", "+3e-2"),
                        ("a fine film", "a fine film"), (0.5, 0.5)):
        assert spreadsheet_safe(value) == safe
    row = {c: "" for c in COLUMNS} | {"text": "=1+1", "score": "-0.125", "query_text": "@bad"}
    path = _write_csv([row], tmp_path / "table.csv")
    with open(path, newline="") as handle:
        back = next(csv.DictReader(handle))
    assert back["text"] == "'=1+1" and back["score"] == "-0.125" and back["query_text"] == "'@bad"


def test_the_report_says_how_near_pretraining_ended_to_an_optimum():
    from flows.stages.multistage import pretraining_convergence
    from flows.experiment.workspace import StageResult

    def pretrain(*losses):
        return StageResult("pretrain", metrics={**{f"loss_epoch_{i}": v for i, v in enumerate(losses)}, "final_loss": losses[-1]})

    # the default settings' pretraining (3 epochs of Adam, 6.25 -> 5.85 in the last) against a converged one;
    # epochs sort by number, not as text (epoch 10 after epoch 9)
    far = pretraining_convergence(pretrain(7.1, 6.25, 5.85))
    assert list(far.values()) == ["-6.40% (far from an optimum: the multi-stage influence function's premise does not hold "
                                  "here, multi-stage MAGIC (attribution.multistage_magic) assumes none)"]
    near = pretraining_convergence(pretrain(*[3.0] * 9, 2.5, 2.495))
    assert list(near.values())[0].startswith("-0.20% (near an optimum")
    assert pretraining_convergence(pretrain(4.0)) == {} and pretraining_convergence(None) == {}
