"""Rank-vs-rank scatter plots of score columns against ground-truth accuracy.

Ranks, not values: the correlations judged are rank correlations, and proxies live on very
different scales (log-determinants, parameter counts, vote positions). Drawn with
matplotlib's object API on an Agg canvas, so no display and no global pyplot state.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy import stats

__all__ = ["rank_scatter_grid"]


def rank_scatter_grid(
    accuracies: ArrayLike,
    scores: Mapping[str, ArrayLike],
    report: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    title: str = "",
    columns_per_row: int = 3,
) -> Path:
    """One panel per score column: proxy rank (x) vs accuracy rank (y), titled with the
    column and its Spearman rho from `report`. Pairs with a NaN are left out. Writes `path`
    (format from its suffix, e.g. .png) and returns it."""
    names = list(scores)
    if not names:
        raise ValueError("no score column to plot")
    accuracies = np.asarray(accuracies, dtype=np.float64)
    cols = min(columns_per_row, len(names))
    rows = math.ceil(len(names) / cols)
    figure = Figure(
        figsize=(3.6 * cols, 3.4 * rows + (0.6 if title else 0)), dpi=110, layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        values = np.asarray(scores[name], dtype=np.float64)
        keep = ~(np.isnan(values) | np.isnan(accuracies))
        if keep.sum() > 0:
            x, y = stats.rankdata(values[keep]), stats.rankdata(accuracies[keep])
            ax.scatter(x, y, s=6 if x.size < 1000 else 2, alpha=0.4, linewidths=0, rasterized=True)
        rho = report.get(name, {}).get("spearman", math.nan)
        ax.set_title(f"{name}\nSpearman {rho:.3f} (n={int(keep.sum())})", fontsize=9)
        ax.set_xlabel("proxy rank", fontsize=8)
        ax.set_ylabel("accuracy rank", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    if title:
        lines = [textwrap.fill(line, 45 * cols) for line in title.splitlines()]
        figure.suptitle("\n".join(lines), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
