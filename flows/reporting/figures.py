"""PNG figures of the report: score distributions, case-deletion curves, mislabel detection, agreement.

Every function takes plain data (arrays, the ``to_dict()`` rows of the evaluation results) and an
output path, writes one PNG and returns the path. Figures are drawn on a ``Figure`` with its own
Agg canvas, never through ``pyplot``'s global state, so they can be made from several threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator

from influence.evaluation.case_deletion import KINDS
from influence.evaluation.lds import average_ranks
from influence.exceptions import invalid

DPI = 110
RANDOM_COLOR = "0.45"
_DELETION_KEYS = ("method", "kind", "k", "mean_top", "mean_random", "interval_low", "interval_high")
_DELETION_TITLES = {
    "proponents": "Top proponents removed: the loss should rise",
    "opponents": "Top opponents removed: the loss should fall",
}


def _figure(width_inches: float, height_inches: float) -> Figure:
    figure = Figure(figsize=(width_inches, height_inches), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _score_arrays(scores: Mapping[str, np.ndarray], *, same_shape: bool) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping) or not scores:
        raise invalid("scores", scores if not isinstance(scores, Mapping) else {}, "a non-empty {method: array}")
    arrays = {str(name): np.asarray(values, dtype=np.float64) for name, values in scores.items()}
    for name, values in arrays.items():
        if values.size == 0:
            raise invalid(f"scores[{name!r}].shape", values.shape, "a non-empty array")
    shapes = {name: values.shape for name, values in arrays.items()}
    if same_shape and len(set(shapes.values())) > 1:
        raise invalid("scores shapes", shapes, "the same shape for every method")
    return arrays


def score_distribution(scores: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Histogram of each method's scores, one panel per method.

    Scores have heavy tails, so each panel covers the 0.5th to 99.5th percentile of its finite
    values; values beyond are counted in the edge bins (and their number is written in the panel).

    Args:
        scores: ``{method: array of any shape}``, e.g. ``[Q, N]`` scores (positive = proponent).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    arrays = _score_arrays(scores, same_shape=False)
    columns = min(3, len(arrays))
    rows = math.ceil(len(arrays) / columns)
    figure = _figure(4.6 * columns, 3.5 * rows + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, (name, values) in zip(axes, arrays.items()):
        finite = values[np.isfinite(values)].ravel()
        if finite.size == 0:
            raise invalid(f"scores[{name!r}]", "no finite value", "at least one finite score")
        low, high = np.percentile(finite, [0.5, 99.5])
        if high <= low:
            low, high = low - 0.5, high + 0.5
        beyond = int(((finite < low) | (finite > high)).sum())
        ax.hist(np.clip(finite, low, high), bins=60, range=(low, high), color="tab:blue", alpha=0.85, histtype="stepfilled")
        if low < 0 < high:
            ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # minor ticks of a log axis: most of the figure's drawing time
        ax.set_title(f"{name}  ({finite.size:,} scores)", fontsize=11)
        ax.set_xlabel("score")
        ax.set_ylabel("count (log)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        note = f"{100 * (finite > 0).mean():.0f}% positive\n{beyond:,} beyond 0.5–99.5%\n(in the edge bins)"
        ax.text(0.98, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
    for ax in axes[len(arrays):]:
        ax.set_visible(False)
    figure.suptitle("Attribution scores (positive = proponent, negative = opponent)", fontsize=13)
    return _save(figure, path)


def _random_spread(row: Mapping) -> float:
    """Half-width ``1.96 sd / sqrt(n)`` of the flattened ``delta_random`` (``nan`` without two values)."""
    flat = np.asarray([v for repeat in row.get("delta_random") or [] for v in repeat], dtype=np.float64)
    return 1.96 * float(flat.std(ddof=1)) / math.sqrt(flat.size) if flat.size >= 2 else math.nan


def deletion_curves(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Case deletion: mean change of the query loss against the number of examples removed.

    One panel per kind; a line per method (error bar: the 95% interval of the per-query difference
    from random, centred on ``mean_top``; a hollow marker where the check did not pass) and the
    random removals (error bar: ``1.96 sd / sqrt(n)`` over all their changes).

    Args:
        rows: ``DeletionResult.to_dict()`` rows: ``method``, ``kind``, ``k``, ``mean_top``,
            ``mean_random``, ``interval_low``, ``interval_high``, optional ``passed``,
            ``delta_random`` ``[R][Q]`` and ``fraction`` (when every row has it, the x axis is the
            percentage of the training set removed).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    if not rows:
        raise invalid("rows", list(rows) if isinstance(rows, Sequence) else rows, "a non-empty list of deletion rows")
    for i, row in enumerate(rows):
        missing = [key for key in _DELETION_KEYS if key not in row]
        if missing:
            raise invalid(f"rows[{i}] keys", sorted(row), f"a dict with the keys {', '.join(_DELETION_KEYS)}")
    as_percent = all(row.get("fraction") is not None for row in rows)
    x_of = (lambda row: 100 * float(row["fraction"])) if as_percent else (lambda row: float(row["k"]))
    kinds = [kind for kind in KINDS if any(row["kind"] == kind for row in rows)]
    kinds += sorted({row["kind"] for row in rows} - set(kinds))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    colors = {method: f"C{j}" for j, method in enumerate(methods)}
    figure = _figure(6.2 * len(kinds), 4.8)
    axes = figure.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        here = [row for row in rows if row["kind"] == kind]
        xs = sorted({x_of(row) for row in here})
        log_x = xs[0] > 0 and xs[-1] / xs[0] >= 5
        for j, method in enumerate(methods):
            points = sorted((x_of(row), row) for row in here if row["method"] == method)
            if not points:
                continue
            shift = 0.06 * (j - (len(methods) - 1) / 2)  # dodge the error bars of different methods
            x = np.asarray([p[0] for p in points])
            x = x * (1 + shift) if log_x else x + shift * (xs[-1] - xs[0] or 1.0)
            y = np.asarray([p[1]["mean_top"] for p in points], dtype=np.float64)
            half = np.asarray([(p[1]["interval_high"] - p[1]["interval_low"]) / 2 for p in points], dtype=np.float64)
            half[~np.isfinite(half)] = np.nan  # one query: no interval, no bar
            ax.errorbar(x, y, yerr=half, color=colors[method], marker="o", markersize=7, capsize=4, label=method)
            failed = np.asarray([not p[1].get("passed", True) for p in points])
            ax.plot(x[failed], y[failed], linestyle="none", marker="o", markersize=4.5, color="white", zorder=4)
        first = {}
        for row in here:
            first.setdefault(x_of(row), row)
        random_y = [float(first[x]["mean_random"]) for x in xs]
        ax.errorbar(xs, random_y, yerr=[_random_spread(first[x]) for x in xs], color=RANDOM_COLOR, linestyle="--",
                    marker="s", markersize=5, capsize=4, label="random removal")
        ax.axhline(0.0, color="black", linewidth=0.8)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(xs, [(f"{x:.2g}%\nk={first[x]['k']}" if as_percent else f"{x:g}") for x in xs])
        ax.set_xlabel("training examples removed (% of the training set)" if as_percent else "examples removed (k)")
        ax.set_ylabel("mean change of the query loss")
        ax.set_title(_DELETION_TITLES.get(kind, kind), fontsize=11)
        handles, _ = ax.get_legend_handles_labels()
        hollow = Line2D([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="white",
                        markeredgecolor="black", label="not passed (95% interval)")
        ax.legend(handles=[*handles, hollow], fontsize=8, loc="best")
    figure.suptitle("Case deletion: retraining without each query's top-k examples vs k random ones", fontsize=12)
    return _save(figure, path)


def mislabel_curve(curve: Mapping, path: str | Path, *, label: str = "self-influence") -> Path:
    """Mislabel detection: share of the flipped labels found against the share of examples inspected.

    Args:
        curve: ``MislabelCurve.to_dict()``: ``inspected``, ``found``, ``random_found`` (``[F]``
            each), ``auc``, optional ``random_auc``, ``n_examples`` and ``n_flipped`` (then the
            perfect ranking is drawn too).
        path: the PNG to write.
        label: name of the ranking in the legend.

    Returns:
        ``path``.
    """
    series = ("inspected", "found", "random_found")
    if any(key not in curve for key in (*series, "auc")):
        raise invalid("curve keys", sorted(curve), "MislabelCurve.to_dict(): " + ", ".join((*series, "auc")))
    inspected, found, random_found = (np.asarray(curve[key], dtype=np.float64) for key in series)
    if inspected.ndim != 1 or inspected.size < 2 or not found.shape == random_found.shape == inspected.shape:
        shapes = {key: np.shape(curve[key]) for key in series}
        raise invalid("curve shapes", shapes, "three 1-d lists of one length >= 2")
    random_auc = curve.get("random_auc", float(np.trapezoid(random_found, inspected)))
    figure = _figure(6.0, 5.0)
    ax = figure.subplots()
    ax.plot(100 * inspected, 100 * found, color="C0", linewidth=2, label=f"{label} (AUC {curve['auc']:.3f})")
    ax.plot(100 * inspected, 100 * random_found, color=RANDOM_COLOR, linestyle="--",
            label=f"random order (AUC {random_auc:.3f})")
    title = "Mislabel detection"
    if curve.get("n_examples") and curve.get("n_flipped"):
        n, flipped = int(curve["n_examples"]), int(curve["n_flipped"])
        perfect = np.minimum(1.0, inspected * n / flipped)
        ax.plot(100 * inspected, 100 * perfect, color="C2", linestyle=":",
                label=f"perfect ranking (AUC {np.trapezoid(perfect, inspected):.3f})")
        title += f": {flipped:,} of {n:,} labels flipped"
    ax.set_xlim(100 * inspected[0], 100 * inspected[-1])
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.set_xlabel("training examples inspected, by decreasing score (%)")
    ax.set_ylabel("flipped labels found (%)")
    ax.set_title(title, fontsize=12)
    ax.legend(loc="lower right", fontsize=9)
    return _save(figure, path)


def rank_correlations(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Spearman correlation (average ranks for ties) between every two methods' flattened scores.

    Args:
        scores: ``{method: array}``, all of one shape with at least two finite values each.

    Returns:
        ``[K, K]`` float64 matrix in the order of ``scores``; ``nan`` where a method's scores are
        constant.
    """
    arrays = _score_arrays(scores, same_shape=True)
    for name, values in arrays.items():
        if not np.isfinite(values).all():
            raise invalid(f"scores[{name!r}]", "an array with NaN or infinite values", "finite scores")
        if values.size < 2:
            raise invalid(f"scores[{name!r}].shape", values.shape, "at least two scores")
    ranks = average_ranks(torch.from_numpy(np.stack([v.ravel() for v in arrays.values()]))).numpy()
    centered = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centered, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = (centered @ centered.T) / np.outer(norms, norms)
    np.fill_diagonal(matrix, np.where(norms > 0, 1.0, np.nan))
    return np.clip(matrix, -1.0, 1.0)


def method_agreement(scores: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Annotated heatmap of :func:`rank_correlations` between methods.

    Args:
        scores: ``{method: array}`` of one shape, e.g. ``[Q, N]`` each.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    matrix = rank_correlations(scores)
    names = [str(name) for name in scores]
    size = len(names)
    figure = _figure(max(5.0, 1.2 * size + 2.8), max(4.2, 1.0 * size + 2.0))
    ax = figure.subplots()
    image = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    for i in range(size):
        for j in range(size):
            value = matrix[i, j]
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=11, color=color)
    ax.set_xticks(range(size), names, rotation=30, ha="right")
    ax.set_yticks(range(size), names)
    figure.colorbar(image, ax=ax, label="Spearman rank correlation")
    count = next(iter(scores.values()))
    ax.set_title(f"Agreement between methods\n(Spearman over {np.size(count):,} scores)", fontsize=12)
    return _save(figure, path)
