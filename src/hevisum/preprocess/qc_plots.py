"""Quality-control plots of preprocessing. Each function draws on a Matplotlib Axes and returns it.

Titles are plain text, given as a string or a list of lines: they usually hold slide ids read from files, so a
``$`` in them is drawn as it is, never parsed as math, and a control character in a name is shown escaped (see
:func:`hevisum.names.plot_text`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from hevisum.names import plot_text


def thumb_step(shape: tuple[int, ...], max_side: int) -> int:
    """The integer reduction that brings an image of ``shape`` to at most ``max_side`` px."""
    return max(1, int(np.ceil(max(shape[:2]) / max_side)))


def thumbnail(image: np.ndarray, step: int) -> np.ndarray:
    """``image`` reduced by an integer ``step`` with box averaging (no aliasing of fine tissue texture)."""
    if step <= 1:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).reduce(step))


def plot_realign(ax, image: np.ndarray, mask: np.ndarray | None, xy_before: np.ndarray, xy_after: np.ndarray,
                 title: str | Sequence[str] = "", max_side: int = 900):
    """The slide with the tissue outline, spot centres before (red) and after (cyan) realignment."""
    k = thumb_step(image.shape, max_side)
    ax.imshow(thumbnail(image, k), interpolation="nearest")
    if mask is not None and mask[::k, ::k].any() and not mask[::k, ::k].all():
        ax.contour(mask[::k, ::k].astype(np.float32), levels=[0.5], colors=["#2ca02c"], linewidths=0.8)
    size = max(2.0, 6000.0 / max(len(xy_before), 1))
    size = min(size, 12.0)
    ax.scatter((xy_before[:, 0] + 0.5) / k - 0.5, (xy_before[:, 1] + 0.5) / k - 0.5, s=size, c="#d62728",
               marker="o", linewidths=0, label="before")
    ax.scatter((xy_after[:, 0] + 0.5) / k - 0.5, (xy_after[:, 1] + 0.5) / k - 0.5, s=size, c="#17becf",
               marker="o", linewidths=0, label="after")
    ax.set_title(_title(title), fontsize=9)
    ax.set_axis_off()
    ax.legend(loc="lower right", fontsize=7, markerscale=2, framealpha=0.7)
    return ax


def plot_slide_qc(ax, image: np.ndarray, xy: np.ndarray, valid: np.ndarray, title: str | Sequence[str] = "",
                  max_side: int = 500):
    """The normalised slide with its (realigned) spots: kept in cyan, dropped (no tissue) as red crosses."""
    k = thumb_step(image.shape, max_side)
    ax.imshow(thumbnail(image, k), interpolation="nearest")
    p = (xy + 0.5) / k - 0.5
    ax.scatter(p[valid, 0], p[valid, 1], s=2, c="#17becf", linewidths=0)
    if (~valid).any():
        ax.scatter(p[~valid, 0], p[~valid, 1], s=12, c="#d62728", marker="x", linewidths=0.8)
    ax.set_title(_title(title), fontsize=8)
    ax.set_axis_off()
    return ax


def _title(title: str | Sequence[str]) -> str:
    """A title given as text or as a list of lines, each drawn as plain text (see :func:`plot_text`)."""
    lines = [title] if isinstance(title, str) else list(title)
    return "\n".join(plot_text(line) for line in lines)


def new_figure(n_axes: int, ncols: int = 4, size: float = 3.2):
    """A Figure (no pyplot state) with a grid of at least ``n_axes`` axes; unused ones are hidden."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_axes))
    nrows = int(np.ceil(n_axes / ncols))
    fig = Figure(figsize=(size * ncols, size * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_axes:]:
        ax.set_axis_off()
    return fig, axes[:n_axes]


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Render a Figure to PNG with the Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with warnings.catch_warnings():
        # a slide id in a script the font lacks draws as boxes; not worth a warning per plot
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
