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


def spot_diameter_points(ax, diameter: float) -> float:
    """Marker area (points²) for spots ``diameter`` data units across, for the axes' current limits and size."""
    fig = ax.figure
    ax.apply_aspect()
    box = ax.get_position()
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    w_in, h_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
    per_unit = min(w_in / max(abs(x1 - x0), 1e-9), h_in / max(abs(y1 - y0), 1e-9)) * 72.0
    return float(max(0.5, (0.9 * diameter * per_unit) ** 2))


def frame_slide(ax, thumb: np.ndarray | None, xy: np.ndarray, pitch: float, margin_pitches: float = 1.5):
    """Draw the (thumbnail) image under the spots' bounding box and fix the limits to it (y down, equal aspect).
    ``xy`` and ``pitch`` are in thumbnail pixels."""
    lo = xy.min(axis=0) - margin_pitches * pitch
    hi = xy.max(axis=0) + margin_pitches * pitch
    if thumb is not None:
        ax.imshow(thumb, extent=(-0.5, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5), interpolation="antialiased")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def value_map(ax, thumb: np.ndarray | None, xy: np.ndarray, values: np.ndarray, pitch: float, title: str,
              cmap: str = "viridis", vmin=None, vmax=None, label: str = "", colorbar: bool = True):
    """Spots coloured by value over a faded image, with a colour bar; ``xy``/``pitch`` in thumbnail pixels."""
    frame_slide(ax, None if thumb is None else _faded(thumb), xy, pitch)
    v = np.asarray(values, dtype=np.float64)
    if vmin is None or vmax is None:
        finite = v[np.isfinite(v)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        vmin = lo if vmin is None else vmin
        vmax = (hi if hi > lo else lo + 1e-6) if vmax is None else vmax
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=spot_diameter_points(ax, pitch), cmap=cmap, vmin=vmin, vmax=vmax,
                    linewidths=0)
    ax.set_title(title, fontsize=8)
    if colorbar:
        cb = ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=6)
        if label:
            cb.set_label(label, fontsize=7)
    return sc


def spots_on_image(ax, thumb: np.ndarray | None, xy: np.ndarray, pitch: float, title: str,
                   groups: np.ndarray | None = None):
    """The H&E (thumbnail) with the spot outlines; spots coloured by ``groups`` (e.g. the held-out block of a
    single-slide cross-validation) when given."""
    frame_slide(ax, thumb, xy, pitch)
    size = spot_diameter_points(ax, pitch)
    if groups is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, facecolors="none", edgecolors="#1f3b73", linewidths=0.4)
    else:
        from matplotlib import colormaps

        cmap = colormaps["tab10"]
        groups = np.asarray(groups, dtype=object)
        for i, g in enumerate(sorted(set(groups.tolist()), key=str)):
            m = groups == g
            ax.scatter(xy[m, 0], xy[m, 1], s=size, facecolors="none", edgecolors=cmap(i % 10), linewidths=0.6,
                       label=f" {g}" if str(g).startswith("_") else str(g))  # "_..." would be hidden
        ax.legend(fontsize=6, loc="lower left", frameon=True, markerscale=0.8)
    ax.set_title(title, fontsize=8)
    return ax


def _faded(img: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image blended with white, so coloured spots stand out on it."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return (255 - alpha * (255 - a.astype(np.float32))).astype(np.uint8)


def message(ax, text: str):
    """An empty panel that says why it is empty."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="#555555", transform=ax.transAxes,
            wrap=True)
    return ax
