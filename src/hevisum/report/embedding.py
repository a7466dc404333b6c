"""Quality control of a feature embedding: does it separate slides (a batch effect) more than biology?

:func:`embedding_qc` projects per-spot features with PCA and UMAP, measures how well slides (and, when given,
groups such as patients or conditions) separate with the silhouette score, and draws one figure: rows PCA and
UMAP, columns coloured by slide, by group and by the dominant predicted target. A silhouette by slide near 1
means the features mostly tell slides apart (stain or scanner differences a model could latch on to); near 0,
spots of different slides mix. The scores go to ``metrics.json`` through :attr:`EmbeddingQC.metrics`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hevisum.errors import HevisumError
from hevisum.names import plot_text

log = logging.getLogger(__name__)

#: Most categories drawn in their own colour; the rarer rest is drawn grey as "other".
MAX_CATEGORIES = 20
#: Components of the PCA space the silhouette scores and UMAP are computed in.
PCA_COMPONENTS = 50


@dataclass
class EmbeddingQC:
    """What :func:`embedding_qc` computed for the spots it used (``rows`` of the input, in order).

    ``pca`` and ``umap`` are (n, 2) coordinates (``umap`` None when UMAP was unavailable or failed);
    ``explained_variance`` the variance ratios of the PCA components used; ``silhouette`` the scores by
    ``"slide"`` and ``"group"`` (None where undefined: fewer than two labels, or no groups); ``figure`` the
    matplotlib Figure; ``metrics`` a JSON-safe summary.
    """

    rows: np.ndarray
    pca: np.ndarray
    umap: np.ndarray | None
    explained_variance: np.ndarray
    silhouette: dict[str, float | None]
    figure: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    umap_error: str | None = None

    def save(self, path: str | Path, *, dpi: int = 110) -> Path:
        """Write the figure to ``path`` as PNG, atomically."""
        from hevisum.io.atomic import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            # the temporary name ends in .tmp, so the format is given explicitly
            self.figure.savefig(tmp, format="png", dpi=dpi)
        return path


def _labels(values: Any, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise HevisumError(f"{name} must have one label per row of features ({n}), got shape {arr.shape}")
    return arr.astype(str)


def _silhouette(space: np.ndarray, labels: np.ndarray | None, seed: int, max_points: int) -> float | None:
    """Silhouette score of ``labels`` in ``space`` (sampled to ``max_points``); None when undefined."""
    if labels is None:
        return None
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(labels) - 1:
        return None
    from sklearn.metrics import silhouette_score

    sample = min(len(labels), max_points) if len(labels) > max_points else None
    score = silhouette_score(space, labels, sample_size=sample, random_state=seed)
    return float(score) if np.isfinite(score) else None


def _run_umap(space: np.ndarray, seed: int, n_neighbors: int) -> tuple[np.ndarray | None, str | None]:
    try:
        import umap
    except Exception as exc:  # noqa: BLE001  (any failure to import means: no UMAP, PCA only)
        msg = f"umap-learn could not be imported ({type(exc).__name__}: {exc}); embedding QC shows PCA only"
        log.warning(msg)
        return None, msg
    n = space.shape[0]
    if n < 5:
        msg = f"too few points for UMAP ({n}); embedding QC shows PCA only"
        log.warning(msg)
        return None, msg
    k = int(min(n_neighbors, n - 1))
    # spectral initialisation needs a well-connected graph; tiny sets use a random (seeded) one
    init = "spectral" if n > 3 * k else "random"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_neighbors=k, n_components=2, random_state=seed, n_jobs=1, init=init)
            coords = np.asarray(reducer.fit_transform(space), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001  (a failed projection must not fail the run report)
        msg = f"UMAP failed ({type(exc).__name__}: {exc}); embedding QC shows PCA only"
        log.warning(msg)
        return None, msg
    return coords, None


def _categorical(ax: Any, xy: np.ndarray, labels: np.ndarray | None, title: str, point_size: float) -> None:
    ax.set_title(plot_text(title), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=point_size, c="#bdbdbd", linewidths=0)
        ax.text(0.5, 0.5, "not given", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                color="#555555", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        return
    names, counts = np.unique(labels, return_counts=True)
    order = names[np.argsort(-counts, kind="stable")]
    shown = list(order[: MAX_CATEGORIES - 1]) if len(order) > MAX_CATEGORIES else list(order)
    other = ~np.isin(labels, shown)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=point_size, c="#cfcfcf", linewidths=0,
                   label=f"other ({len(order) - len(shown)})")
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(shown) <= 10 else "tab20"]
    for i, name in enumerate(shown):
        m = labels == name
        # a legend label starting with "_" would be hidden by matplotlib; a leading space keeps it
        text = plot_text(name)
        ax.scatter(xy[m, 0], xy[m, 1], s=point_size, color=cmap(i % cmap.N), linewidths=0,
                   label=f" {text}" if text.startswith("_") else text)
    ax.legend(fontsize=6, markerscale=2.0, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
              ncols=1 if len(shown) <= 10 else 2)


def _figure(coords: list[tuple[str, np.ndarray]], columns: list[tuple[str, np.ndarray | None]],
            title: str | None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6 * len(columns), 3.8 * len(coords)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(coords), len(columns), squeeze=False)
    n = coords[0][1].shape[0]
    point_size = float(np.clip(3000.0 / max(n, 1), 1.0, 20.0))
    for r, (proj, xy) in enumerate(coords):
        for c, (what, labels) in enumerate(columns):
            _categorical(axes[r, c], xy, labels, f"{proj}, by {what}", point_size)
            axes[r, c].set_xlabel(f"{proj} 1", fontsize=7)
            axes[r, c].set_ylabel(f"{proj} 2", fontsize=7)
    if title is not None:
        fig.suptitle(plot_text(title), fontsize=10)
    fig.tight_layout()
    return fig


def embedding_qc(
    features: np.ndarray,
    slides: np.ndarray,
    groups: np.ndarray | None = None,
    dominant: np.ndarray | None = None,
    *,
    seed: int = 0,
    max_points: int = 5000,
    use_umap: bool = True,
    n_neighbors: int = 15,
    standardise: bool = True,
    title: str | None = None,
    out: str | Path | None = None,
) -> EmbeddingQC:
    """PCA and UMAP of per-spot ``features`` (N, F) with silhouette scores by slide and by group, and a figure.

    ``slides`` (N,) are slide ids; ``groups`` (N,) optional group labels (patient, condition...); ``dominant``
    (N,) optional labels such as each spot's dominant predicted target (name of the largest predicted
    proportion). When N > ``max_points``, a random subset of that size (from ``seed``) is used throughout.
    Features are z-scored per column over all spots first (``standardise``; constant columns become 0), then
    projected on up to :data:`PCA_COMPONENTS` principal components; silhouettes (Euclidean) and UMAP are computed
    in that space. UMAP is seeded, hence deterministic for a seed (and single-threaded); if umap-learn cannot be
    imported or fails, a warning is logged and only the PCA row is drawn. ``out`` writes the figure as PNG.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 1:
        raise HevisumError(f"features must be an (N, F) array with at least 3 rows, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise HevisumError("features contain NaN or infinite values; remove or impute them first")
    if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 3:
        raise HevisumError(f"max_points must be an integer >= 3, got {max_points!r}")
    n = x.shape[0]
    slide_lab = _labels(slides, n, "slides")
    if slide_lab is None:
        raise HevisumError("slides must be given (one slide id per row of features)")
    group_lab = _labels(groups, n, "groups")
    dom_lab = _labels(dominant, n, "dominant")

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    x = x[rows]
    slide_lab = slide_lab[rows]
    group_lab = group_lab[rows] if group_lab is not None else None
    dom_lab = dom_lab[rows] if dom_lab is not None else None

    if standardise:
        sd = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(sd > 1e-12, sd, 1.0)
    from sklearn.decomposition import PCA

    k = int(min(PCA_COMPONENTS, x.shape[0] - 1, x.shape[1]))
    pca = PCA(n_components=k, svd_solver="full", random_state=seed)
    space = pca.fit_transform(x)
    # a sign convention per component, so the same data always give the same picture
    flip = np.sign(space[np.argmax(np.abs(space), axis=0), np.arange(k)])
    space = space * np.where(flip == 0, 1.0, flip)
    pca_xy = space[:, :2] if k >= 2 else np.column_stack([space[:, 0], np.zeros(len(space))])

    umap_xy, umap_error = _run_umap(space, seed, n_neighbors) if use_umap else (None, "UMAP not requested")

    silhouette = {
        "slide": _silhouette(space, slide_lab, seed, max_points),
        "group": _silhouette(space, group_lab, seed, max_points),
    }
    coords = [("PCA", pca_xy)] + ([("UMAP", umap_xy)] if umap_xy is not None else [])
    columns = [("slide", slide_lab), ("group", group_lab), ("dominant predicted target", dom_lab)]
    fig = _figure(coords, columns, title)
    evr = np.asarray(pca.explained_variance_ratio_, dtype=np.float64)
    metrics = {
        "silhouette_slide": silhouette["slide"],
        "silhouette_group": silhouette["group"],
        "n_points": int(len(rows)),
        "n_slides": int(len(np.unique(slide_lab))),
        "n_groups": int(len(np.unique(group_lab))) if group_lab is not None else None,
        "pca_components": k,
        "pca_explained_variance_2": float(evr[:2].sum()),
        "pca_explained_variance_all": float(evr.sum()),
        "umap": umap_xy is not None,
        "seed": int(seed),
    }
    result = EmbeddingQC(rows=rows, pca=pca_xy, umap=umap_xy, explained_variance=evr, silhouette=silhouette,
                         figure=fig, metrics=metrics, umap_error=umap_error if use_umap else None)
    if out is not None:
        result.save(out)
    return result
