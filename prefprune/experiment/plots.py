"""The experiment's PNG plots: accuracy vs pruned fraction, score histograms (matplotlib Agg, imported
lazily)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefprune._io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["ACCURACY_PLOT", "HISTOGRAM_PLOT", "write_plots"]

ACCURACY_PLOT = "accuracy_vs_fraction.png"
HISTOGRAM_PLOT = "score_histograms.png"


def write_plots(results: Mapping[str, Any], folder: str | os.PathLike) -> list[str]:
    """Accuracy vs pruned fraction per method, and score histograms split by flipped/clean.

    Returns:
        The PNG file names written (relative to `folder`); empty when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'prefprune[plots]')")
        return []
    folder = Path(folder)
    written = []
    arms = results["summary"]["arms"]
    base = results["baseline"]
    if arms and base.get("accuracy_mean") is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, style in (("harmful", "-o"), ("helpful", "--s")):
            for method in dict.fromkeys(r["method"] for r in arms if r["mode"] == mode):
                rows = sorted(
                    (r for r in arms if r["mode"] == mode and r["method"] == method),
                    key=lambda r: r["fraction"],
                )
                xs = [0.0] + [100 * r["fraction"] for r in rows]
                ys = [100 * base["accuracy_mean"]] + [100 * r["accuracy_mean"] for r in rows]
                stds = [base.get("accuracy_std")] + [r["accuracy_std"] for r in rows]
                es = [100 * (s or 0.0) for s in stds]  # no bar for one seed (its std is None)
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{method} ({mode})", alpha=0.85)
        ax.set_xlabel("training pairs removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy after pruning and retraining (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        atomic_write(folder / ACCURACY_PLOT, lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
        written.append(ACCURACY_PLOT)
    hists = results.get("histograms") or {}
    if hists:
        names = list(hists)
        ncol = min(3, len(names))
        nrow = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            groups = hists[name]
            every = [v for values in groups.values() for v in values]
            # Shared bin edges, so the flipped and clean histograms are comparable bar for bar.
            edges = np.histogram_bin_edges(every, bins=30) if every else 30
            for label, values in groups.items():
                if values:
                    ax.hist(values, bins=edges, alpha=0.6, label=f"{label} ({len(values)})", density=True)
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.suptitle("Score distributions (first seed)", fontsize=10)
        fig.tight_layout()
        atomic_write(folder / HISTOGRAM_PLOT, lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
        written.append(HISTOGRAM_PLOT)
    return written
