"""report.html: one self-contained page a person reads (or mails) after a run.

Every figure is embedded in the page as a base64 PNG (``data:`` URI); nothing is linked, so the page can be sent
alone. The same figures are also saved under ``figures/`` for reuse. Every name read from the input (slide ids,
target names) is escaped for HTML (:func:`~hevisum.names.html_text`), drawn through
:func:`~hevisum.names.plot_text`, and turned into file names by :func:`~hevisum.names.safe_name`.

Sections: the run in numbers and its warnings; the methods beside the baselines; the per-target table (sortable,
also written as ``per_target.csv``); loss curves; one section per slide (the H&E with its spots, truth and
prediction maps of the most variable targets with the slide's score, the realignment QC); the embedding QC
(its numbers go to ``metrics.json`` under ``embedding_qc``); the preprocessing QC overview; explanations
(``explain/*.png``); the files of the run folder.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.io.atomic import atomic_write_text
from hevisum.methods import baseline_names
from hevisum.names import html_text, plot_text, safe_name

log = logging.getLogger("hevisum")

MAX_TRAIN_MAPS = 40  # training slides mapped (test slides always are)
MAX_EXPLAIN_FIGURES = 24


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4f}"


def _top_variable_targets(Y: np.ndarray, k: int = 3) -> list[int]:
    """The ``k`` targets whose values vary most across spots (NaN rows ignored)."""
    if Y.size == 0 or not np.isfinite(Y).any():
        return list(range(min(k, Y.shape[1])))
    sd = np.nan_to_num(np.nanstd(Y, axis=0), nan=-1.0)
    return [int(i) for i in np.argsort(-sd, kind="stable")[:k]]


def _subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kw):
    """A figure and its axes, outside pyplot: the report never touches the session's backend or figures (an
    interactive session that calls hevisum.run keeps drawing inline)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def compact_png(png: bytes, max_side: int = 1600, colours: int = 256) -> bytes:
    """A smaller PNG of the same figure for embedding: on white, at most ``max_side`` px, ``colours`` palette
    colours (figures are flat colours and colour maps; a few MB per report becomes a few hundred kB). The
    original when that is not smaller (or the image cannot be read)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            rgb = Image.new("RGB", im.size, "white")
            rgb.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        rgb.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        rgb.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    except (OSError, ValueError):
        return png
    return buf.getvalue() if buf.tell() < len(png) else png


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Page:
    """The HTML body being built, and the figures it embeds (also saved under ``figures/``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.parts: list[str] = []

    def add(self, *html: str) -> None:
        self.parts.extend(html)

    def figure(self, fig, name: str, title: str, caption: str = "", dpi: int = 110) -> None:
        """Embed a matplotlib figure; saved as ``figures/<name>`` too."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        png = buf.getvalue()
        (self.folder / "figures").mkdir(parents=True, exist_ok=True)
        (self.folder / "figures" / name).write_bytes(png)
        self.image(png, title, caption, f"figures/{name}")

    def image(self, png: bytes, title: str, caption: str = "", file: str = "") -> None:
        cap = " ".join(x for x in (caption, f"<span class=file>{html_text(file)}</span>" if file else "") if x)
        self.add(f'<figure><img src="{data_uri(compact_png(png))}" alt="{html_text(title)}">'
                 + (f"<figcaption>{cap}</figcaption>" if cap else "") + "</figure>")


def write_report(folder: Path, result, n_maps: int = 3) -> Path:
    """Write report.html (and figures/, per_target.csv) into ``folder`` for a
    :class:`hevisum.pipeline.RunResult`; adds ``embedding_qc`` to ``result.metrics``. Returns the HTML path."""
    from hevisum.report import plots

    folder = Path(folder)
    prep, metrics, folds = result.prep, result.metrics, result.cv.folds
    results, target_names = result.cv.results, list(result.targets.names)
    summaries = metrics["methods"]
    baselines = [b for b in baseline_names() if b in summaries]
    test = metrics.get("test")
    best = metrics["selected"]
    page = _Page(folder)
    pred, truth, split = _predictions(folder, result)

    # ---- the run in numbers
    page.add(
        "<h1>hevisum run report</h1>",
        f"<p>Profile <b>{html_text(metrics['profile'])}</b>, seed {html_text(metrics['seed'])}, device "
        f"{html_text(metrics['device'])}, encoder {html_text(metrics.get('encoder', ''))}; "
        f"{metrics['n_train_spots']} training spots in {len(metrics['folds'])} cross-validation folds, "
        f"{metrics['n_test_spots']} test spots; {metrics.get('seconds', 0):.0f} s. "
        f"Selected by cross-validation: <b>{html_text(best)}</b>.</p>",
        *[f"<p class=warn>Warning: {html_text(w)}</p>" for w in metrics.get("selection", {}).get("warnings", [])],
        "<p>Cross-validation scores are computed on out-of-fold predictions (each spot predicted by the model "
        "that never saw its slide, or its block of a single slide); the stacker is scored by a nested "
        "leave-one-slide-out over those. Predictions are per-spot rank scores (0..1, higher = more abundant "
        "relative to the spot's other targets), not proportions.</p>",
        _nav(),
    )
    rows_html = []
    for name, s in summaries.items():
        t = (test or {}).get(name, {}).get("overall", {})
        rows_html.append(
            f"<tr{' class=sel' if name == best else ''}><td>{html_text(name)}"
            f"{' (baseline)' if name in baselines else ''}</td>"
            f"<td>{_fmt(s['cv_spot_spearman'])}</td><td>{_fmt(s['cv_fold_mean'])}</td>"
            f"<td>{_fmt(s['cv_target_pearson_mean'])}</td>"
            f"<td>{_fmt(t.get('spot_spearman'))}</td><td>{_fmt(t.get('target_pearson_mean'))}</td></tr>")
    page.add("<h2 id=methods>Methods beside the baselines</h2>",
             "<table><tr><th>method</th><th>CV per-spot Spearman</th><th>mean over folds</th>"
             "<th>CV per-target Pearson</th><th>test per-spot Spearman</th><th>test per-target Pearson</th></tr>",
             *rows_html, "</table>")
    fig, ax = _subplots(figsize=(max(5, 1.1 * len(summaries)), 4))
    plots.methods_bar(ax, summaries, test, baselines=baselines)
    fig.tight_layout()
    page.figure(fig, "methods.png", "Methods beside the baselines",
                "Bars: cross-validated per-spot Spearman; dots: held-out slides (or blocks); diamond: test.")

    # ---- per target
    ref = max(baselines, key=lambda b: summaries[b]["cv_spot_spearman"] or -1) if baselines else best
    table = _per_target_table(result, best, ref, truth)
    atomic_write_text(folder / "per_target.csv", table.to_csv(index=False))
    page.add("<h2 id=targets>Per target</h2>",
             f"<p>Pearson and Spearman correlation across spots of each target: {html_text(best)} (selected) beside "
             f"the best baseline {html_text(ref)}, in cross-validation" + (" and on the test slides" if test else "")
             + ". Click a column to sort. The same table is in <span class=file>per_target.csv</span>.</p>",
             _html_table(table))
    pt = summaries[best]["cv"]["per_target"]
    other = summaries.get(ref, {}).get("cv", {}).get("per_target")
    fig, ax = _subplots(figsize=(7, max(4, 0.18 * len(pt))))
    plots.per_target_bars(ax, {plot_text(k): v for k, v in pt.items()},
                          {plot_text(k): v for k, v in other.items()} if other else None, label=plot_text(best),
                          other_label=plot_text(ref))
    fig.tight_layout()
    page.figure(fig, "per_target.png", f"Per-target Pearson of {best} (cross-validation)")

    logs = {}
    for r in results:
        for fm, held in zip(r.models, folds.slide_ids):
            if getattr(fm, "log", None) is not None and len(fm.log):
                logs[plot_text(f"{r.name} fold {held}")] = fm.log
    if logs:
        fig, (a1, a2) = _subplots(1, 2, figsize=(10, 4))
        plots.loss_curves(a1, a2, logs)
        fig.tight_layout()
        page.add("<h2 id=training>Training</h2>")
        page.figure(fig, "loss_curves.png", "Loss curves (tile models)")

    # ---- one section per slide
    tops = _top_variable_targets(np.asarray(prep.targets, dtype=np.float64)[folds.train_rows], n_maps)
    units = "rank score" if result.cfg.train.target == "rank" else "predicted value"
    page.add("<h2 id=slides>Slides</h2>",
             "<p>Each slide: the H&amp;E with its spots (coloured by cross-validation block when one slide is cut "
             "into blocks), then, for the " + str(len(tops)) + " most variable targets, the truth (top, in the "
             "input's units) and the prediction (bottom: out-of-fold for training slides, the selected method for "
             "test slides), each with its own colour bar; the per-spot Spearman of each spot is mapped below the "
             "H&amp;E. Maps of one slide cut into blocks are stitched back into one.</p>")
    train_ids = [s for s in prep.slide_ids() if s not in set(prep.slide_ids("test"))]
    shown = set(prep.slide_ids("test")) | set(train_ids[:MAX_TRAIN_MAPS])
    block_of = _blocks(folds, len(prep.spots))
    for i, slide in enumerate(prep.slide_ids()):
        if slide not in shown:
            continue
        _slide_section(page, i, slide, result, pred, truth, split, tops, target_names, units, block_of, plots)
    if len(train_ids) > MAX_TRAIN_MAPS:
        page.add(f"<p>{len(train_ids) - MAX_TRAIN_MAPS} more training slides are not mapped.</p>")

    # ---- embedding QC, preprocessing QC, explanations, files
    _embedding_section(page, result, pred, target_names)
    qc_png = prep.workdir / "qc" / "overview.png"
    if qc_png.is_file():
        page.add("<h2 id=qc>Preprocessing QC</h2>")
        page.image(qc_png.read_bytes(), "Preprocessing QC overview",
                   "Every slide with its spots; red: no tissue under the spot.", "prep/qc/overview.png")
    explain = sorted((folder / "explain").rglob("*.png")) if (folder / "explain").is_dir() else []
    page.add("<h2 id=explain>Explanations</h2>")
    if explain:
        for p in explain[:MAX_EXPLAIN_FIGURES]:
            page.image(p.read_bytes(), p.stem, "", str(p.relative_to(folder)))
        if len(explain) > MAX_EXPLAIN_FIGURES:
            page.add(f"<p>{len(explain) - MAX_EXPLAIN_FIGURES} more figures in explain/.</p>")
    else:
        page.add("<p>None in this run folder (figures saved under <span class=file>explain/</span> appear "
                 "here).</p>")
    _files_section(page, folder)

    html = ("<!doctype html><html><head><meta charset='utf-8'><title>hevisum report</title><style>"
            "body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
            "text-align:right;font-size:0.9em}td:first-child,th:first-child{text-align:left}"
            "th.sort{cursor:pointer;background:#f3f3f3}.warn{color:#a00;font-weight:bold}"
            "tr.sel{background:#eef4ff;font-weight:bold}img{max-width:100%}figure{margin:0.8em 0}"
            "figcaption{font-size:0.85em;color:#555}.file{font-family:monospace;color:#555}"
            "div.scroll{max-height:32em;overflow:auto}nav a{margin-right:0.8em}"
            "</style></head><body>" + "\n".join(page.parts) + _SORT_JS + "</body></html>")
    out = folder / "report.html"
    atomic_write_text(out, html)
    return out


# ------------------------------------------------------------------------------------------- data


def _predictions(folder: Path, result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prepared-spot row: the selected method's prediction, the truth and the split (``test``/``train_oof``;
    NaN / '' where none), read from the predictions.h5ad just written (else rebuilt from the result)."""
    prep, folds = result.prep, result.cv.folds
    n, t = len(prep.spots), len(result.targets.names)
    pred = np.full((n, t), np.nan, dtype=np.float64)
    truth = np.full((n, t), np.nan, dtype=np.float64)
    split = np.full(n, "", dtype=object)
    path = folder / "predictions.h5ad"
    if path.is_file():
        import anndata as ad

        a = ad.read_h5ad(path)
        keys = pd.MultiIndex.from_arrays([prep.spots["slide"].astype(str).to_numpy(),
                                          prep.spots["spot_id"].astype(str).to_numpy()])
        pos = pd.MultiIndex.from_arrays([a.obs["slide"].astype(str).to_numpy(),
                                         a.obs["ID"].astype(str).to_numpy()]).get_indexer(keys)
        found = pos >= 0
        pred[found] = np.asarray(a.X, dtype=np.float64)[pos[found]]
        if "truth" in a.layers:
            truth[found] = np.asarray(a.layers["truth"], dtype=np.float64)[pos[found]]
        if "split" in a.obs:
            split[found] = a.obs["split"].astype(str).to_numpy()[pos[found]]
        return pred, truth, split
    best = result.metrics["selected"]
    oof = next((r.oof for r in result.cv.results if r.name == best), None)
    if oof is None and result.cv.stack is not None:
        oof = result.cv.stack.oof
    if oof is not None:
        pred[folds.train_rows] = oof
    if len(folds.test_rows) and best in (result.test.preds or {}):
        pred[folds.test_rows] = result.test.preds[best]
    truth[folds.train_rows] = np.asarray(result.targets.raw, dtype=np.float64)[folds.train_rows]
    split[folds.train_rows], split[folds.test_rows] = "train_oof", "test"
    return pred, truth, split


def _blocks(folds, n: int) -> np.ndarray | None:
    """The cross-validation block of each row when one slide is cut into blocks (``slide#blockK``), else None."""
    if not any("#block" in str(s) for s in folds.slides):
        return None
    out = np.full(n, "", dtype=object)
    out[folds.train_rows] = [str(s).rsplit("#", 1)[-1] for s in folds.slides]
    return out


def _per_target_table(result, best: str, ref: str, truth: np.ndarray) -> pd.DataFrame:
    """One row per target: CV (and test) Pearson/Spearman of the selected method and the best baseline, and
    how much the target varies; sorted by the selected method's CV Pearson."""
    metrics = result.metrics
    names = list(result.targets.names)
    cv = metrics["methods"][best]["cv"]["per_target"]
    base = metrics["methods"].get(ref, {}).get("cv", {}).get("per_target", {})
    test = (metrics.get("test") or {}).get(best, {}).get("overall", {}).get("per_target")

    def get(d, name, key):
        v = (d or {}).get(name, {}).get(key)
        return np.nan if v is None else float(v)

    cols = {"target": names, "column": [f"C{i + 1}" for i in range(len(names))],
            "cv_pearson": [get(cv, n, "pearson") for n in names],
            "cv_spearman": [get(cv, n, "spearman") for n in names],
            "baseline_cv_pearson": [get(base, n, "pearson") for n in names]}
    if test:
        cols["test_pearson"] = [get(test, n, "pearson") for n in names]
        cols["test_spearman"] = [get(test, n, "spearman") for n in names]
    with np.errstate(all="ignore"):
        Y = np.asarray(result.targets.raw, dtype=np.float64)[result.cv.folds.train_rows]
        cols["truth_mean"] = np.nanmean(Y, axis=0) if len(Y) else np.full(len(names), np.nan)
        cols["truth_sd"] = np.nanstd(Y, axis=0) if len(Y) else np.full(len(names), np.nan)
    df = pd.DataFrame(cols)
    df.attrs["baseline"] = ref
    return df.sort_values("cv_pearson", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------- sections


def _nav() -> str:
    links = ["<a href='#methods'>methods</a>", "<a href='#targets'>per target</a>", "<a href='#slides'>slides</a>"]
    links += ["<a href='#embedding'>embedding QC</a>", "<a href='#qc'>preprocessing QC</a>",
              "<a href='#explain'>explanations</a>", "<a href='#files'>files</a>"]
    return "<nav>" + " ".join(links) + "</nav>"


def _html_table(df: pd.DataFrame) -> str:
    heads = "".join(f"<th class=sort>{html_text(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, (float, np.floating)):
                cells.append(f"<td data-v='{float(v) if np.isfinite(v) else ''}'>{_fmt(float(v))}</td>")
            else:
                cells.append(f"<td>{html_text(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class=scroll><table class=sortable><thead><tr>{heads}</tr></thead><tbody>" + "".join(body) \
        + "</tbody></table></div>"


_SORT_JS = """<script>
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-asc') !== '1';
      t.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-asc'); });
      th.setAttribute('data-asc', asc ? '1' : '0');
      function key(r) { var c = r.cells[i], v = c.getAttribute('data-v');
        return v === null ? c.textContent : (v === '' ? NaN : parseFloat(v)); }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x === 'number' || typeof y === 'number') {
          if (isNaN(x)) return 1; if (isNaN(y)) return -1; return asc ? x - y : y - x; }
        return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
</script>"""


def _slide_section(page: _Page, i: int, slide: str, result, pred, truth, split, tops, names, units, block_of,
                   plots) -> None:
    from hevisum.metrics import mean_spot_spearman, per_spot_spearman

    prep = result.prep
    spots = prep.spots
    rows = np.flatnonzero(spots["slide"].astype(str).to_numpy() == slide)
    kind = str(spots["split"].iloc[rows[0]])
    view = (result.thumbs or {}).get(slide)
    thumb, scale = (None, 1.0) if view is None else tuple(view)
    xy = spots.iloc[rows][["x", "y"]].to_numpy(np.float64) * scale
    pitch = float(spots.iloc[rows]["pitch_px"].median()) * scale if "pitch_px" in spots else 10.0
    P, T = pred[rows], truth[rows]
    has_p = np.isfinite(P).all(axis=1)
    has_t = np.isfinite(T).all(axis=1)
    both = has_p & has_t
    score = mean_spot_spearman(P[both], T[both]) if both.any() else None
    what = "held out in cross-validation" if kind == "train" else "test"
    title = f"{slide} ({what})" + (f": per-spot Spearman {score:.3f}" if score is not None and np.isfinite(score)
                                   else "")
    nrows = 2 if has_t.any() else 1
    fig, axes = _subplots(nrows, 1 + len(tops), figsize=(3.4 * (1 + len(tops)), 3.3 * nrows), squeeze=False)
    groups = None
    if block_of is not None and kind == "train":
        groups = np.array([plot_text(f"{slide}#{b}") if b else "" for b in block_of[rows]], dtype=object)
    plots.spots_on_image(axes[0, 0], thumb, xy, pitch, plot_text(f"H&E, {len(rows)} spots"), groups)
    if nrows == 2:
        if both.any():
            plots.value_map(axes[1, 0], None, xy[both], per_spot_spearman(P[both], T[both]), pitch,
                            "per-spot Spearman", cmap="RdBu_r", vmin=-1, vmax=1)
        else:
            plots.message(axes[1, 0], "no predictions")
    for j, t in enumerate(tops):
        name = plot_text(names[t][:32])
        if nrows == 2:
            plots.value_map(axes[0, j + 1], None, xy[has_t], T[has_t, t], pitch, f"truth: {name}",
                            label="input units")
        if has_p.any():
            plots.value_map(axes[-1, j + 1], None, xy[has_p], P[has_p, t], pitch,
                            f"{'out-of-fold ' if kind == 'train' else ''}prediction: {name}", label=units)
        else:
            plots.message(axes[-1, j + 1], "no predictions")
    fig.suptitle(plot_text(title), fontsize=10)
    fig.tight_layout()
    page.add(f"<h3 id='slide-{i}'>{html_text(slide)} <small>({html_text(what)}, {len(rows)} spots"
             + (f", per-spot Spearman {_fmt(score)}" if score is not None else "") + ")</small></h3>")
    page.figure(fig, f"map_{safe_name(slide)}.png", f"Maps of slide {slide}")
    qc = prep.workdir / "qc" / f"{safe_name(slide)}_realign.png"
    if qc.is_file():
        page.image(qc.read_bytes(), f"Realignment QC of slide {slide}",
                   "Realignment QC: spots before (input) and after the shift hevisum applied.",
                   f"prep/qc/{qc.name}")


def _embedding_section(page: _Page, result, pred: np.ndarray, names: list[str]) -> None:
    """PCA/UMAP of the features the image models saw, coloured by slide and by the dominant predicted target;
    silhouette scores to ``result.metrics['embedding_qc']``."""
    page.add("<h2 id=embedding>Embedding QC</h2>")
    try:
        features, described = _qc_features(result)
        from hevisum.report.embedding import embedding_qc

        slides = result.prep.spots["slide"].astype(str).to_numpy()
        ok = np.isfinite(pred).all(axis=1)
        dominant = np.where(ok, np.asarray(names, dtype=object)[np.argmax(np.nan_to_num(pred, nan=-np.inf), axis=1)],
                            "no prediction")
        split = result.prep.spots["split"].astype(str).to_numpy()  # train / test: do the test slides sit apart?
        both = len(set(split)) > 1
        qc = embedding_qc(features, slides, groups=split if both else None, dominant=dominant.astype(str),
                          seed=int(result.cfg.seed),
                          title=f"Embedding QC: {described}" + ("; groups: train / test slides" if both else ""))
    except Exception as e:  # noqa: BLE001 - the QC must never fail a finished run
        log.warning("embedding QC failed: %s", e)
        result.metrics["embedding_qc"] = {"error": f"{type(e).__name__}: {e}"}
        page.add(f"<p>Not available: {html_text(type(e).__name__)}: {html_text(e)}</p>")
        return
    result.metrics["embedding_qc"] = {"features": described, "groups": "split (train / test)" if both else None,
                                      **qc.metrics}
    sil = qc.metrics.get("silhouette_slide")
    page.add(f"<p>Features: {html_text(described)}, {qc.metrics['n_points']} spots. Silhouette by slide: "
             f"<b>{_fmt(sil)}</b> (near 1: the features mostly tell slides apart, a batch effect a model can latch "
             "on to; near 0: spots of different slides mix); by split (train / test slides): "
             f"<b>{_fmt(qc.metrics.get('silhouette_group'))}</b>."
             + (f" {html_text(qc.umap_error)}." if qc.umap_error else "") + "</p>")
    page.figure(qc.figure, "embedding_qc.png", "Embedding QC")


def _qc_features(result) -> tuple[np.ndarray, str]:
    """The selected encoder's spot features when a method of the run uses the encoder, else colour statistics."""
    from hevisum.features import FeatureStore
    from hevisum.methods import get_method

    cfg, prep = result.cfg, result.prep
    uses_encoder = any(s.source == "encoder" for r in result.cv.results for s in get_method(r.name)(cfg).features())
    # the tiles the run's encoder saw (features cached on disk)
    store = FeatureStore.for_prep(prep, cfg, str(result.metrics.get("device", "cpu")))
    if uses_encoder:
        return store.base("encoder", "spot", "embed"), f"{cfg.encoder.name} encoder features of the spot tiles"
    return store.base("colour", "spot", "embed"), "colour statistics of the spot tiles (no encoder method ran)"


def _files_section(page: _Page, folder: Path) -> None:
    from hevisum.outputs import written_files

    rows = written_files(folder)
    if not any(n == "report.html" for n, _ in rows):
        rows.insert(0, ("report.html", "this report"))
    page.add("<h2 id=files>Files in the run folder</h2><table><tr><th>file</th><th>what it is</th></tr>",
             *[f"<tr><td class=file>{html_text(n)}</td><td style='text-align:left'>{html_text(w)}</td></tr>"
               for n, w in rows], "</table>")
