"""report.html: one page a person reads after a run, with PNG figures beside it."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from hevisum.io.atomic import atomic_write_text
from hevisum.methods import baseline_names


def _fig_path(folder: Path, name: str) -> Path:
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    return folder / "figures" / name


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"figures/{path.name}"


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4f}"


def _top_variable_targets(Y: np.ndarray, k: int = 3) -> list[int]:
    return list(np.argsort(-np.nanstd(Y, axis=0))[:k])


def write_report(folder: Path, result, n_maps: int = 3) -> Path:
    """Write figures and report.html into ``folder`` for a :class:`hevisum.pipeline.RunResult`; returns the
    HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hevisum.report import plots

    from hevisum.names import html_text, plot_text, safe_name

    prep, metrics, folds = result.prep, result.metrics, result.cv.folds
    results, target_names = result.cv.results, result.targets.names
    baselines = [b for b in baseline_names() if b in metrics["methods"]]
    figs: list[tuple[str, str]] = []
    summaries = metrics["methods"]
    test = metrics.get("test")
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(summaries)), 4))
    plots.methods_bar(ax, summaries, test, baselines=baselines)
    figs.append(("Methods beside the baselines", _save(fig, _fig_path(folder, "methods.png"))))

    best = metrics["selected"]
    pt = summaries[best]["cv"]["per_target"]
    ref = max(baselines, key=lambda b: summaries[b]["cv_spot_spearman"] or -1) if baselines else best
    other = summaries.get(ref, {}).get("cv", {}).get("per_target")
    fig, ax = plt.subplots(figsize=(7, max(4, 0.18 * len(pt))))
    plots.per_target_bars(ax, pt, other, label=best, other_label=ref)
    figs.append((f"Per-target Pearson of {best} (cross-validation)", _save(fig, _fig_path(folder, "per_target.png"))))

    logs = {}
    for r in results:
        for fm, held in zip(r.models, folds.slide_ids):
            if fm.log is not None and len(fm.log):
                logs[plot_text(f"{r.name} fold {held}")] = fm.log
    if logs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        plots.loss_curves(a1, a2, logs)
        figs.append(("Loss curves (tile models)", _save(fig, _fig_path(folder, "loss_curves.png"))))

    # Spatial maps: predicted vs true for the most variable targets on each held-out slide.
    oof = {r.name: r.oof for r in results}
    oof_best = oof.get(best)
    if oof_best is None:
        import pandas as pd

        oof_best = pd.read_csv(folder / f"oof_{best}.csv").iloc[:, 2:].to_numpy(np.float32)
    Y = np.asarray(prep.targets)[folds.train_rows]
    tops = _top_variable_targets(Y, n_maps)
    for held in folds.slide_ids:
        m = folds.slides == held
        rows = folds.train_rows[m]
        xy = prep.spots.iloc[rows][["x", "y"]].to_numpy(float)
        fig, axes = plt.subplots(2, len(tops), figsize=(3.2 * len(tops), 6.2), squeeze=False)
        for j, t in enumerate(tops):
            from scipy.stats import rankdata

            true_r = rankdata(Y[m, t]) / m.sum()
            pred_r = rankdata(oof_best[m, t]) / m.sum()
            plots.spatial_map(axes[0, j], None, xy, true_r, plot_text(f"true {target_names[t][:24]} (rank)"), 0, 1)
            plots.spatial_map(axes[1, j], None, xy, pred_r, plot_text(f"predicted ({best})"), 0, 1)
        fig.suptitle(plot_text(f"held-out slide {held}"))
        figs.append((f"Spatial maps, held-out slide {held}",
                     _save(fig, _fig_path(folder, f"map_{safe_name(held)}.png"))))

    qc_png = prep.workdir / "qc" / "overview.png"
    rows_html = []
    for name, s in summaries.items():
        t = (test or {}).get(name, {}).get("overall", {})
        rows_html.append(
            f"<tr{' class=sel' if name == best else ''}><td>{html.escape(name)}"
            f"{' (baseline)' if name in baselines else ''}</td>"
            f"<td>{_fmt(s['cv_spot_spearman'])}</td><td>{_fmt(s['cv_fold_mean'])}</td>"
            f"<td>{_fmt(s['cv_target_pearson_mean'])}</td>"
            f"<td>{_fmt(t.get('spot_spearman'))}</td><td>{_fmt(t.get('target_pearson_mean'))}</td></tr>"
        )
    body = [
        "<h1>hevisum run report</h1>",
        f"<p>Profile <b>{html.escape(str(metrics['profile']))}</b>, seed {metrics['seed']}, device "
        f"{html.escape(str(metrics['device']))}; {metrics['n_train_spots']} training spots in "
        f"{len(metrics['folds'])} leave-one-slide-out folds, {metrics['n_test_spots']} test spots; "
        f"{metrics['seconds']:.0f} s. Selected by cross-validation: <b>{html.escape(best)}</b>.</p>",
        "<p>Cross-validation scores are computed on out-of-fold predictions (each spot predicted by the model "
        "that never saw its slide); the stacker is scored by a nested leave-one-slide-out over those.</p>",
        *[f"<p class=warn>Warning: {html_text(w)}</p>" for w in metrics.get("selection", {}).get("warnings", [])],
        "<table><tr><th>method</th><th>CV per-spot Spearman</th><th>mean over folds</th>"
        "<th>CV per-target Pearson</th><th>test per-spot Spearman</th><th>test per-target Pearson</th></tr>",
        *rows_html,
        "</table>",
    ]
    for title, src in figs:
        body.append(f"<h2>{html.escape(title)}</h2><img src='{src}' alt='{html.escape(title)}'>")
    if qc_png.is_file():
        body.append("<h2>Preprocessing QC</h2><img src='prep/qc/overview.png' alt='QC overview'>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>hevisum report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child{text-align:left}.warn{color:#a00;font-weight:bold}tr.sel{background:#eef4ff;font-weight:bold}img{max-width:100%}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    out = folder / "report.html"
    atomic_write_text(out, page)
    return out
