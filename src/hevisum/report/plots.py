"""Plots for the run report. Each takes an Axes (or a Figure), draws, and returns it; nothing is shown."""

from __future__ import annotations

import numpy as np


def methods_bar(ax, summaries: dict, test: dict | None = None, baselines=()):
    """Cross-validated per-spot Spearman per method (bars), folds as dots, test score as a diamond."""
    names = list(summaries)
    cv = [summaries[n]["cv_spot_spearman"] or np.nan for n in names]
    colours = ["#9e9e9e" if n in baselines else "#3f6fb5" for n in names]
    x = np.arange(len(names))
    ax.bar(x, cv, color=colours)
    for i, n in enumerate(names):
        folds = list(summaries[n].get("cv_fold_spot_spearman", {}).values())
        ax.scatter(np.full(len(folds), i), folds, color="black", s=10, zorder=3)
        if test and n in test and test[n]["overall"]["spot_spearman"] is not None:
            ax.scatter([i], [test[n]["overall"]["spot_spearman"]], marker="D", color="#d62728", zorder=4,
                       label="test" if i == 0 else None)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("mean per-spot Spearman")
    finite = [v for v in cv if np.isfinite(v)]
    lo = min(finite + [0.0]) if finite else 0.0
    ax.set_ylim(min(0.0, lo - 0.05), 1.0)
    ax.set_title("Methods vs baselines (grey); dots: held-out slides")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color="#3f6fb5", label="cross-validation (all out-of-fold spots)"),
                Patch(color="#9e9e9e", label="baseline, cross-validation")]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    return ax


def per_target_bars(ax, per_target: dict, other: dict | None = None, label: str = "", other_label: str = ""):
    """Per-target Pearson (across spots) of one method, optionally beside another."""
    names = list(per_target)
    vals = [per_target[n]["pearson"] if per_target[n]["pearson"] is not None else np.nan for n in names]
    y = np.arange(len(names))
    h = 0.4 if other else 0.8
    ax.barh(y - (h / 2 if other else 0), vals, height=h, color="#3f6fb5", label=label)
    if other:
        ov = [other[n]["pearson"] if other[n]["pearson"] is not None else np.nan for n in names]
        ax.barh(y + h / 2, ov, height=h, color="#9e9e9e", label=other_label)
    ax.set_yticks(y, [n[:28] for n in names], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("Pearson r across spots (cross-validation)")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def loss_curves(ax_loss, ax_score, logs: dict):
    """Training loss and validation per-spot Spearman per epoch, one line per fold."""
    for label, log in logs.items():
        ax_loss.plot(log["epoch"], log["train_loss"], label=f"{label} train")
        ax_loss.plot(log["epoch"], log["val_loss"], ls="--", label=f"{label} val")
        ax_score.plot(log["epoch"], log["val_spearman"], label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("inner-validation per-spot Spearman")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=6)
    if ax_score.get_legend_handles_labels()[0]:
        ax_score.legend(fontsize=6)
    return ax_loss, ax_score


def spatial_map(ax, image: np.ndarray | None, xy: np.ndarray, values: np.ndarray, title: str, vmin=None, vmax=None,
                size: float = 12):
    """Spots coloured by value over the (downsampled) slide image."""
    if image is not None:
        ax.imshow(image, alpha=0.5)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", vmin=vmin, vmax=vmax, linewidths=0)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    if image is None:
        ax.invert_yaxis()
        ax.set_aspect("equal")
    return sc
