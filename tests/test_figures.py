"""Report figures: each writes a readable PNG; the agreement matrix against scipy's Spearman."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.reporting import figures
from influence.evaluation import DeletionResult, detection_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 100 and height > 100
    return width, height


def heavy_scores(seed: int = 0, shape: tuple[int, ...] = (4, 300)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_t(df=2, size=shape) * 1e-3
    return {
        "if": base,
        "tracin": base * 5 + rng.normal(scale=2e-3, size=shape),
        "tracin_we": rng.standard_cauchy(size=shape),
        "grad_cos": -base + rng.normal(scale=1e-3, size=shape),
    }


def deletion_rows(n_query: int = 4, repeats: int = 3) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for k in (5, 10, 50):
        random = rng.normal(scale=0.1, size=(repeats, n_query)).tolist()
        for method in ("if", "tracin_we"):
            for kind, sign in (("proponents", 1), ("opponents", -1)):
                top = (sign * 0.01 * k + rng.normal(scale=0.05, size=n_query)).tolist()
                rows.append(DeletionResult(method, k, top, random, kind=kind).to_dict())
    return rows


# -- each figure is a valid PNG ------------------------------------------------------------------


def test_score_distribution(tmp_path):
    width, height = assert_png(figures.score_distribution(heavy_scores(), tmp_path / "sub" / "scores.png"))
    assert width > height  # four panels: 3 + 1


def test_score_distribution_of_constant_scores(tmp_path):
    assert_png(figures.score_distribution({"grad_cos": np.ones(10)}, tmp_path / "one.png"))


def test_deletion_curves_with_k(tmp_path):
    rows = deletion_rows()
    assert "fraction" not in rows[0]
    assert_png(figures.deletion_curves(rows, tmp_path / "deletion.png"))


def test_deletion_curves_with_fraction_one_query_and_one_kind(tmp_path):
    rows = [dict(row, fraction=row["k"] / 1000) for row in deletion_rows(n_query=1, repeats=1)]
    rows = [row for row in rows if row["kind"] == "proponents"]
    assert rows[0]["interval_low"] == -math.inf  # one query: no interval, no error bar
    assert_png(figures.deletion_curves(rows, tmp_path / "deletion.png"))


def test_mislabel_curve(tmp_path):
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(200, generator=g)[:20]
    scores = torch.rand(200, generator=g, dtype=torch.float64)
    scores[flipped] += 0.5
    curve = detection_curve(scores, flipped).to_dict()
    assert_png(figures.mislabel_curve(json.loads(json.dumps(curve)), tmp_path / "mislabel.png"))
    bare = {key: curve[key] for key in ("inspected", "found", "random_found", "auc")}
    assert_png(figures.mislabel_curve(bare, tmp_path / "bare.png", label="tracin"))


def test_method_agreement(tmp_path):
    assert_png(figures.method_agreement(heavy_scores(), tmp_path / "agreement.png"))


def test_figures_from_threads(tmp_path):
    """No pyplot state: figures drawn concurrently all come out whole."""
    scores = heavy_scores()
    paths = [tmp_path / f"agreement{i}.png" for i in range(4)]
    threads = [threading.Thread(target=figures.method_agreement, args=(scores, p)) for p in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sizes = {assert_png(p) for p in paths}
    assert len(sizes) == 1


# -- the Spearman matrix -------------------------------------------------------------------------


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    scores = heavy_scores(shape=(3, 40))
    scores["ties"] = rng.integers(0, 4, size=(3, 40)).astype(float)  # many ties: average ranks
    matrix = figures.rank_correlations(scores)
    names = list(scores)
    assert matrix.shape == (5, 5)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            expected = stats.spearmanr(scores[a].ravel(), scores[b].ravel()).statistic
            assert matrix[i, j] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(matrix, matrix.T, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.diag(matrix), np.ones(5))


def test_rank_correlations_of_known_orders():
    a = np.arange(10.0)
    matrix = figures.rank_correlations({"a": a, "cube": a**3, "reversed": -a, "constant": np.zeros(10)})
    assert matrix[0, 1] == pytest.approx(1.0) and matrix[0, 2] == pytest.approx(-1.0)
    assert np.isnan(matrix[3]).all() and np.isnan(matrix[:, 3]).all()


# -- input validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [figures.score_distribution, figures.method_agreement])
def test_empty_scores_are_refused(function, tmp_path):
    with pytest.raises(ValueError, match=r"scores=\{\}"):
        function({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_mismatched_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"scores shapes=\{'a': \(2, 3\), 'b': \(3, 2\)\}"):
        figures.method_agreement({"a": np.zeros((2, 3)), "b": np.zeros((3, 2))}, tmp_path / "x.png")


def test_bad_scores_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"scores\['a'\].shape=\(0,\)"):
        figures.score_distribution({"a": np.zeros(0)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"scores\['a'\]='no finite value'"):
        figures.score_distribution({"a": np.full(3, np.nan)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"scores\['b'\]"):
        figures.rank_correlations({"a": np.zeros(3), "b": np.array([0.0, np.inf, 1.0])})


def test_bad_deletion_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"rows=\[\]"):
        figures.deletion_curves([], tmp_path / "x.png")
    row = deletion_rows()[0]
    del row["mean_top"]
    with pytest.raises(ValueError, match=r"rows\[0\] keys="):
        figures.deletion_curves([row], tmp_path / "x.png")


def test_bad_mislabel_curve_is_refused(tmp_path):
    with pytest.raises(ValueError, match="curve keys="):
        figures.mislabel_curve({"inspected": [0.0, 1.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="curve shapes="):
        figures.mislabel_curve({"inspected": [0.0, 1.0], "found": [0.0], "random_found": [0.0, 1.0], "auc": 0.5},
                               tmp_path / "x.png")
