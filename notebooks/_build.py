"""Build the notebooks in this folder from the Python source below, without outputs.

    python notebooks/_build.py          write every notebook
    python notebooks/_build.py --check  exit 1 when a committed notebook differs from this source

Editing a notebook here (rather than in JupyterLab) keeps the notebooks reviewable as plain Python, free of
outputs and execution counts, with stable cell ids. tests/test_notebooks.py checks that the committed files match.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (hevisum)", "language": "python"}
PARAMETERS_TAG = "parameters"  # the first code cell, the one to edit (papermill's convention)

Cell = tuple[str, str]


def md(text: str) -> Cell:
    """A markdown cell (the text is dedented)."""
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> Cell:
    """A code cell (the text is dedented)."""
    return ("code", textwrap.dedent(text).strip("\n"))


DATA_CELL = code('''
    # The data to use. None: a small generated demo dataset, written to a temporary folder.
    # Or a competition-layout HDF5 file, e.g. the real HER2ST slides beside the repository,
    # "../../shared/data/challenge/her2st.h5" (relative to this notebooks/ folder), or the Kaggle
    # "elucidata_ai_challenge_data.h5".
    DATA = None
''')


def setup_cell(tag: str, spec: str = "DemoSpec(seed=0)", about: str = "") -> Cell:
    """The second cell of every notebook: imports, a temporary work folder, the slides (demo or DATA)."""
    about = about or ("4 training slides + 1 test slide; S_2 lies on a black background, "
                      "the spots of S_1, S_3 and S_5 are shifted against the image")
    return code(f'''
        %matplotlib inline
        import tempfile
        from pathlib import Path

        import matplotlib.pyplot as plt
        import numpy as np
        import pandas as pd

        from hevisum.demo import DemoSpec, truth_path_for, write_demo
        from hevisum.io.competition import read_competition_h5

        SPEC = {spec}  # {about}
        # Everything this notebook writes goes into a fresh temporary folder, never into the repository.
        WORK = Path(tempfile.mkdtemp(prefix="hevisum-{tag}-"))
        if DATA is None:
            H5, TRUTH = write_demo(WORK / "demo.h5", SPEC, progress=False)
        else:
            H5 = Path(DATA).expanduser()
            TRUTH = truth_path_for(H5)  # <name>_test_truth.csv beside the file, used when it exists
        slides = read_competition_h5(H5)
        train = [s for s in slides if s.split == "train"]
        print(f"work folder: {{WORK}}")
        pd.DataFrame([{{"slide": s.slide_id, "split": s.split, "spots": s.n_spots,
                       "image (W x H)": f"{{s.image.shape[1]}} x {{s.image.shape[0]}}"}} for s in slides]).set_index("slide")
    ''')


NOTEBOOKS: dict[str, list[Cell]] = {}

# ------------------------------------------------------------------------------------------------ 01
NOTEBOOKS["01_stain_normalisation"] = [
    md('''
        # 01 · Stain normalisation

        H&E colour differs from slide to slide (stain batch, section thickness, scanner). A model trained on the
        colours of some slides meets other colours on a new slide, and part of what it learned stops applying.
        Stain normalisation maps every slide onto one target appearance. The target is **fitted on training tissue
        only** (fit, then apply), so the test slide never shapes it.

        * **Macenko** (the reference's choice): in optical density, OD = −log(I / I₀), each pixel is a mix of two
          stain vectors, haematoxylin and eosin. They are read from the extreme angles of the stained pixels in the
          plane of the two main OD directions; normalising swaps an image's own vectors for the target's and rescales
          the stain amounts to the target's 99th percentile.
        * **Reinhard**: match the mean and spread of each LAB channel. Cheap, but blind to stains: a slide with more
          eosin-rich tissue is pulled towards the average colour as if that were a staining difference.
    '''),
    DATA_CELL,
    setup_cell("nb01"),
    md('''
        The target is fitted as the reference did: a few random 256-px patches per training slide that are at least
        half tissue (fixed seed), and only their tissue pixels, so background (white glass or black) never reaches
        the fit.
    '''),
    code('''
        from hevisum.config import StainConfig
        from hevisum.preprocess import fit_macenko, fit_reinhard, normalize_macenko, normalize_reinhard, tissue_mask
        from hevisum.preprocess.stain import tissue_patch_pixels

        cfg = StainConfig()  # the pipeline's defaults: 8 patches of 256 px per training slide, >= 50 % tissue, seed 0
        masks = {s.slide_id: tissue_mask(s.image) for s in slides}
        # one random stream per slide, as the pipeline does: adding a slide leaves the others' patches unchanged
        pixels = [tissue_patch_pixels(s.image, masks[s.slide_id], cfg.patch_size, cfg.n_patches, cfg.min_tissue,
                                      np.random.default_rng([cfg.seed, i])) for i, s in enumerate(train)]
        macenko, reinhard = fit_macenko(pixels), fit_reinhard(pixels)
        print(f"fitted on {macenko.n_pixels:,} tissue pixels of {len(train)} training slides")
        print("Macenko target stain vectors (OD of R, G, B; columns haematoxylin, eosin):")
        print(macenko.he.round(3))
        print("Reinhard target LAB mean", np.round(reinhard.lab_mean, 1), "std", np.round(reinhard.lab_std, 1))
    '''),
    md('''
        Every slide, the test slide included, is mapped to these targets. Each image's own stains are estimated from
        its tissue pixels only (the mask); the background is painted white afterwards (notebook 02), as the pipeline
        does, so that only tissue colours are compared here.
    '''),
    code('''
        from hevisum.preprocess import mask_background

        versions = {}
        for s in slides:
            m = masks[s.slide_id]
            versions[s.slide_id] = {
                "original": mask_background(s.image, m, "white"),
                "Macenko": mask_background(normalize_macenko(s.image, macenko, m), m, "white"),
                "Reinhard": mask_background(normalize_reinhard(s.image, reinhard, m), m, "white"),
            }


        from scipy import ndimage as ndi


        def tissue_window(mask, side=300):
            """(row, column slices) of the ``side``-px square holding the most tissue."""
            side = min(side, *mask.shape)
            density = ndi.uniform_filter(mask.astype(np.float32), side, mode="constant")
            cy, cx = np.unravel_index(int(np.argmax(density)), mask.shape)
            y0 = int(np.clip(cy - side // 2, 0, mask.shape[0] - side))
            x0 = int(np.clip(cx - side // 2, 0, mask.shape[1] - side))
            return slice(y0, y0 + side), slice(x0, x0 + side)


        methods = ["original", "Macenko", "Reinhard"]
        fig, axes = plt.subplots(3, len(slides), figsize=(2.4 * len(slides), 7.4), squeeze=False)
        for col, s in enumerate(slides):
            window = tissue_window(masks[s.slide_id])
            for row, method in enumerate(methods):
                ax = axes[row, col]
                ax.imshow(versions[s.slide_id][method][window])
                ax.set_title(f"{s.slide_id} ({s.split}) · {method}", fontsize=8)
                ax.set_axis_off()
        fig.tight_layout()
    '''),
    md('''
        In numbers: how far apart the slides' mean tissue colours are, as the mean colour distance ΔE between two
        slides (in LAB, where a distance of about 2 is just noticeable), and the spread of each LAB channel
        (L = lightness, a = green–red, b = blue–yellow). Both methods bring the slides closer. Reinhard drives the
        difference to about zero by construction, which is also its weakness: a real difference in tissue composition
        is erased along with the staining difference.
    '''),
    code('''
        from skimage.color import rgb2lab


        def mean_tissue_lab(image, mask):
            px = image[mask][:: max(1, int(mask.sum()) // 50_000)]  # a subsample is plenty for a mean
            return rgb2lab(px[None].astype(np.float64) / 255.0)[0].mean(axis=0)


        spread = {}
        for method in methods:
            lab = np.array([mean_tissue_lab(versions[s.slide_id][method], masks[s.slide_id]) for s in slides])
            pairwise = np.linalg.norm(lab[:, None] - lab[None, :], axis=-1)
            n = len(lab)
            spread[method] = {"mean ΔE between slides": pairwise.sum() / (n * (n - 1)),
                              **dict(zip(["L std", "a std", "b std"], lab.std(axis=0)))}
        spread = pd.DataFrame(spread).T
        spread.round(2)
    '''),
    code('''
        # the claim of this notebook, checked: both normalisations bring the slides' colours closer together
        de = spread["mean ΔE between slides"]
        assert de["Macenko"] < de["original"] and de["Reinhard"] < de["original"]
    '''),
    md('''
        **In the pipeline**: `[stain] method = "macenko"` (or `"reinhard"`, `"none"`), `n_patches`, `patch_size`,
        `min_tissue`, `seed`, and `reference_slide` to fit on one chosen slide instead of every training slide.
        `hevisum preprocess` writes the fitted target to `stain.json`; `hevisum predict` reuses the run's saved target,
        so new slides are normalised exactly like the training slides were.
    '''),
]

# ------------------------------------------------------------------------------------------------ 02
NOTEBOOKS["02_background_masking"] = [
    md('''
        # 02 · Background masking

        Every later step needs to know where the tissue is: the stain fit (01), realignment (03), dropping spots
        without tissue (04). And tiles at the tissue edge show background: when some slides lie on white glass and
        others on black, a model sees two kinds of "nothing" and may learn the difference as if it meant something.

        The reference's rule (a 7-px Gaussian blur of the min–max normalised grey image, below its mean) assumes a
        white background. hevisum scores a pixel as tissue when it is both **coloured** (chroma) and **away from the
        background's brightness**, reads the background colour (white or black) from the image border, blurs the
        score, thresholds it with Otsu's method and removes specks and small holes. Then every slide's background is
        painted one colour (white by default).
    '''),
    DATA_CELL,
    setup_cell("nb02"),
    code('''
        from scipy import ndimage as ndi

        from hevisum.preprocess import mask_background, tissue_mask
        from hevisum.preprocess.tissue import detect_background


        def reference_mask(image, sigma=7.0):
            """The reference's rule, for comparison: blurred, min-max normalised grey image below its mean."""
            grey = ndi.gaussian_filter(image.mean(axis=2), sigma)
            grey = (grey - grey.min()) / (grey.max() - grey.min())
            return grey < grey.mean()


        masks = {s.slide_id: tissue_mask(s.image) for s in slides}  # background="auto": read from the border
        ref_masks = {s.slide_id: reference_mask(s.image) for s in slides}
        table = pd.DataFrame({
            "background": {s.slide_id: detect_background(s.image) for s in slides},
            "tissue fraction": {k: m.mean() for k, m in masks.items()},
            "tissue fraction (reference rule)": {k: m.mean() for k, m in ref_masks.items()},
        })
        if DATA is None:
            # the demo knows where its tissue is: score both masks against it (intersection over union)
            from hevisum.demo import make_demo_slides

            true_masks = {s.slide_id: s.meta["tissue_mask"] for s in make_demo_slides(SPEC)}

            def iou(a, b):
                return (a & b).sum() / (a | b).sum()

            table["IoU"] = {k: iou(masks[k], t) for k, t in true_masks.items()}
            table["IoU (reference rule)"] = {k: iou(ref_masks[k], t) for k, t in true_masks.items()}
        table.round(3)
    '''),
    md('''
        One slide of each background (when there is one): the image, the tissue outline found by hevisum (green),
        the reference rule's mask, and the slide after masking. On black the reference rule takes the dark background
        for tissue.
    '''),
    code('''
        black = [s for s in slides if table.loc[s.slide_id, "background"] == "black"]
        white = [s for s in slides if table.loc[s.slide_id, "background"] == "white"]
        shown = (black[:1] + white[:1]) if black else white[:2]
        fig, axes = plt.subplots(len(shown), 4, figsize=(12, 3.2 * len(shown)), squeeze=False)
        for row, s in zip(axes, shown):
            m = masks[s.slide_id]
            row[0].imshow(s.image)
            row[0].set_title(f"{s.slide_id}: {table.loc[s.slide_id, 'background']} background", fontsize=9)
            row[1].imshow(s.image)
            row[1].contour(m.astype(float), levels=[0.5], colors=["#2ca02c"], linewidths=1)
            row[1].set_title("hevisum tissue mask", fontsize=9)
            row[2].imshow(ref_masks[s.slide_id], cmap="gray")
            row[2].set_title("reference rule (white = tissue)", fontsize=9)
            row[3].imshow(mask_background(s.image, m, "white"))
            row[3].set_title("background painted white", fontsize=9)
            for ax in row:
                ax.set_axis_off()
        fig.tight_layout()
    '''),
    code('''
        if DATA is None:
            # the claims above, checked on the demo: hevisum's mask is close to the truth on both backgrounds,
            # and the reference rule fails on the black one
            assert table["IoU"].min() > 0.9
            assert all(table.loc[s.slide_id, "IoU (reference rule)"] < 0.5 for s in black)
    '''),
    md('''
        **In the pipeline**: `[tissue] background = "auto"` (or force `"white"` / `"black"`), `blur_sigma = 7`,
        `mask_background = true`, `fill = "white"`. Large slides are masked at a reduced scale (`max_side`, 2048 px)
        and the mask is upsampled, which keeps whole-slide images cheap.
    '''),
]

# ------------------------------------------------------------------------------------------------ 03
NOTEBOOKS["03_spot_realignment"] = [
    md('''
        # 03 · Spot realignment

        On some slides the spot coordinates are offset from the image: in the competition data many spots of S_1 and
        S_2 fell on background. One global shift (dx, dy) per slide fixes it; the reference chose it by eye from an
        overlay plot.

        hevisum estimates it. Spots were placed where tissue is, so the right shift puts every spot centre **on
        tissue** and every **empty lattice site** just beyond the grid (a position where the grid would continue but no
        spot was kept) **on background**. Every whole-pixel shift within ±1.5 pitches is scored by how many of these
        constraints it satisfies, on a tissue mask with sharp edges; the answer is the score-weighted centroid of
        the best shifts (sub-pixel). A slide that is already aligned keeps (0, 0).

        The demo shifted the spots of some slides by a known amount (stored = true + applied shift), so the estimated
        correction should be close to **minus** the applied shift.
    '''),
    DATA_CELL,
    setup_cell("nb03"),
    code('''
        from hevisum.config import PreprocessConfig
        from hevisum.preprocess import estimate_shift, invalid_spots, spot_pitch, tissue_mask
        from hevisum.preprocess.pipeline import realignment_mask

        cfg = PreprocessConfig()
        rows, masks, before, after = [], {}, {}, {}
        for s in slides:
            pitch = spot_pitch(s.xy)
            # blurred by only 0.05 pitch: the main mask's 7-px blur would move the tissue edge by part of a pitch
            sharp = realignment_mask(s.image, pitch, cfg)
            dx, dy = estimate_shift(sharp, s.xy, pitch, cfg.realign.max_shift_pitches * pitch, cfg.realign.min_gain)
            masks[s.slide_id], before[s.slide_id], after[s.slide_id] = tissue_mask(s.image), s.xy, s.xy + [dx, dy]
            window = cfg.spots.window_pitches * pitch  # the invalid-spot window of notebook 04
            row = {"slide": s.slide_id, "pitch px": pitch, "estimated dx": dx, "estimated dy": dy,
                   "off tissue before": int(invalid_spots(masks[s.slide_id], before[s.slide_id], window).sum()),
                   "off tissue after": int(invalid_spots(masks[s.slide_id], after[s.slide_id], window).sum())}
            if "applied_shift" in s.meta:  # demo data: the shift that was applied, and how far we are from undoing it
                ax_, ay_ = s.meta["applied_shift"]
                row.update({"applied dx": ax_, "applied dy": ay_, "error px": float(np.hypot(dx + ax_, dy + ay_))})
            rows.append(row)
        table = pd.DataFrame(rows).set_index("slide")
        table.round(2)
    '''),
    md('''
        Red: the spot centres as stored; cyan: after realignment; green: the tissue outline. The second figure zooms
        in on the slide with the largest shift, where realignment brought the most tissue under a spot.
    '''),
    code('''
        from hevisum.preprocess.qc_plots import plot_realign

        ncols = min(3, len(slides))
        nrows = -(-len(slides) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.2 * nrows), squeeze=False)
        for ax, s in zip(axes.ravel(), slides):
            dx, dy = table.loc[s.slide_id, ["estimated dx", "estimated dy"]]
            plot_realign(ax, s.image, masks[s.slide_id], before[s.slide_id], after[s.slide_id],
                         title=f"{s.slide_id} ({s.split}): shift ({dx:+.1f}, {dy:+.1f}) px")
        for ax in axes.ravel()[len(slides):]:
            ax.set_axis_off()
        fig.tight_layout()
    '''),
    code('''
        from hevisum.preprocess.spots import tissue_fraction_at

        shift = np.hypot(table["estimated dx"], table["estimated dy"])
        s = next(s for s in slides if s.slide_id == shift.idxmax())
        pitch = table.loc[s.slide_id, "pitch px"]
        window = cfg.spots.window_pitches * pitch
        gained = (tissue_fraction_at(masks[s.slide_id], after[s.slide_id], window)
                  - tissue_fraction_at(masks[s.slide_id], before[s.slide_id], window))
        cx, cy = after[s.slide_id][int(np.argmax(gained))]
        fig, ax = plt.subplots(figsize=(5, 5))
        plot_realign(ax, s.image, masks[s.slide_id], before[s.slide_id], after[s.slide_id],
                     title=f"{s.slide_id}, zoomed", max_side=10**6)  # full resolution: pixel coordinates
        ax.set_xlim(cx - 5 * pitch, cx + 5 * pitch)
        ax.set_ylim(cy + 5 * pitch, cy - 5 * pitch)  # rows grow downwards
        fig.tight_layout()
    '''),
    code('''
        if DATA is None:
            # the claim, checked on the demo: every known shift is undone to within 2 px, and no more spots sit on
            # background afterwards than before
            assert table["error px"].max() < 2.0
            assert (table["off tissue after"] <= table["off tissue before"]).all()
    '''),
    md('''
        **In the pipeline**: `[realign] enabled = true`, `max_shift_pitches = 1.5`, `min_gain` (keep (0, 0) unless a
        shift does clearly better). A shift chosen by hand overrides the estimate:
        `[realign.manual] S_1 = [-65, -70]` (the shift another competitor used for S_1). `hevisum preprocess` writes
        the shift of every slide to `qc.json` and this overlay to `qc/<slide>_realign.png`.
    '''),
]

# ------------------------------------------------------------------------------------------------ 04
NOTEBOOKS["04_invalid_spots"] = [
    md('''
        # 04 · Invalid spots

        After realignment a few training spots may still sit on background (torn tissue, ragged edges). Their targets
        describe tissue the tile does not show, so they would teach the model something false: they are **dropped
        from training**. A spot is invalid when the square window of about one pitch around it (26 × 26 px at a pitch
        of 25 px in the reference) holds no tissue at all.

        **Test spots are always kept**: the submission needs a prediction for every one of them.

        Below, the whole preprocessing pipeline runs twice: once without realignment (many spots off tissue, so the
        rule has plenty to do) and once as configured by default.
    '''),
    DATA_CELL,
    setup_cell("nb04"),
    code('''
        from dataclasses import replace

        from hevisum.config import PreprocessConfig, RealignConfig
        from hevisum.preprocess import preprocess

        cfg = PreprocessConfig()
        runs = {
            "without realignment": preprocess(slides, replace(cfg, realign=RealignConfig(enabled=False)),
                                              WORK / "prep-no-realign", progress=False),
            "with realignment": preprocess(slides, cfg, WORK / "prep", progress=False),
        }
        split = {s.slide_id: s.split for s in slides}
        parts = {}
        for label, prep in runs.items():
            qc = pd.DataFrame(prep.qc).T
            parts[label] = pd.DataFrame({
                "spots": qc["n_spots"].astype(int),
                "invalid": (qc["n_spots"] - qc["n_valid"]).astype(int),
                "tiles kept": prep.spots.groupby("slide").size(),
            })
        counts = pd.concat(parts, axis=1)
        counts.insert(0, "split", pd.Series(split))
        counts
    '''),
    md('''
        Invalid training spots are gone from the tile cache (`spots.csv`, `tiles.npy`) and listed in
        `dropped_spots.csv`; invalid test spots stay, marked `valid = False`.
    '''),
    code('''
        prep = runs["without realignment"]
        n_test = sum(s.n_spots for s in slides if s.split == "test")
        test_rows = prep.spots[prep.spots["split"] == "test"]
        print(f"test spots: {n_test} in the input, {len(test_rows)} in the tile cache, "
              f"{int((~test_rows['valid']).sum())} of them off tissue but kept")
        dropped = pd.read_csv(prep.workdir / "dropped_spots.csv")
        print(f"dropped training spots: {len(dropped)}")
        dropped.head()
    '''),
    code('''
        for label, prep in runs.items():
            train_rows = prep.spots[prep.spots["split"] == "train"]
            # the rule, checked: no invalid training spot reaches training, and every test spot is kept
            assert train_rows["valid"].all()
            assert (prep.spots["split"] == "test").sum() == n_test
            n_invalid_train = sum(prep.qc[s.slide_id]["n_spots"] - prep.qc[s.slide_id]["n_valid"] for s in train)
            assert len(pd.read_csv(prep.workdir / "dropped_spots.csv")) == n_invalid_train
    '''),
    md('''
        The pipeline's own QC figure (`qc/overview.png` in the work folder) shows the normalised, masked slides with
        the kept spots in cyan and the spots off tissue as red crosses. Without realignment:
    '''),
    code('''
        from IPython.display import Image

        Image(filename=str(runs["without realignment"].workdir / "qc" / "overview.png"))
    '''),
    md('''
        **In the pipeline**: `[spots] drop_invalid = true`, `window_pitches = 1.04` (26 px at pitch 25),
        `min_tissue = 0.0` (raise it to also drop spots with only a sliver of tissue). Realignment (03) runs first,
        so a slide whose grid was merely shifted loses no spots.
    '''),
]

# ------------------------------------------------------------------------------------------------ 05
NOTEBOOKS["05_rank_transform"] = [
    md('''
        # 05 · Rank transform of the targets

        The competition score is, for each spot, the Spearman correlation between the predicted and the true
        35-vector, averaged over spots: within a spot only the **order** of the cell types counts. Training on each
        spot's ranks 1..T (the reference's step 5) spends the model's capacity on that order instead of on absolute
        values that the score never sees.

        **Near-ties.** Deconvolution leaves absent cell types at about 1e-10, jittered in the last digits. Is the order
        of those tiny values noise, to be given one shared rank, or does it carry something a model can learn? The
        metric ranks them like any other value, so the question is empirical. hevisum measures it below, and the
        default follows the measurement: `[targets] tie_tol = 0` (plain ranks).
    '''),
    DATA_CELL,
    setup_cell("nb05"),
    code('''
        from scipy.stats import rankdata

        from hevisum.preprocess import rank_targets

        Y = np.concatenate([s.targets for s in train])  # (training spots, T) raw abundances
        slide_of = np.concatenate([[s.slide_id] * len(s.targets) for s in train])
        names = train[0].target_names
        R_collapsed = rank_targets(Y, tie_tol=1e-6)  # values within 1e-6 of the spot's maximum share one rank
        R = rank_targets(Y, tie_tol=0.0)  # plain ranks (the default), as the metric sees them
        tiny = Y < 1e-6 * Y.max(axis=1, keepdims=True)
        print(f"{len(Y)} training spots, {Y.shape[1]} targets; near-zero values per spot: median "
              f"{int(np.median(tiny.sum(axis=1)))}")
    '''),
    md('''
        A typical spot (median number of near-zero values): its values on a log scale, and the two rankings.
    '''),
    code('''
        i = int(np.argsort(tiny.sum(axis=1), kind="stable")[len(Y) // 2])
        order = np.argsort(Y[i])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
        a1.bar(range(len(order)), Y[i, order], color="#3f6fb5")
        a1.set_yscale("log")
        a1.set_xticks(range(len(order)), [names[j][:14] for j in order], rotation=90, fontsize=6)
        a1.set_ylabel("abundance (log scale)")
        a1.set_title(f"spot {i}: targets sorted by value", fontsize=9)
        a2.plot(range(len(order)), R[i, order], "o-", color="#d62728", ms=3, label="plain ranks (default)")
        a2.plot(range(len(order)), R_collapsed[i, order], "o-", color="#9e9e9e", ms=3, label="near-ties collapsed")
        a2.set_xlabel("targets sorted by value")
        a2.set_ylabel("rank")
        a2.legend(fontsize=8)
        fig.tight_layout()
    '''),
    md('''
        **Is the order of the tiny values predictable?** For every spot of a slide, the Spearman correlation between
        its near-zero values and the average log-value of the same cell types over the *other* slides. Pure noise
        gives about 0 on average; a positive mean says the order repeats across slides, so it is learnable. On the
        real HER2ST slides (set `DATA` to `her2st.h5`) it is 0.07-0.12 per slide and 0.15 on C6, and fitting the
        models to plain ranks raised the cross-validated per-spot Spearman by 0.018 for every method, baselines
        included ([docs/benchmarks.md](../docs/benchmarks.md)). The generated demo data draws its tiny values at
        random, so here it should be near 0.
    '''),
    code('''
        from scipy.stats import spearmanr

        logY = np.log10(np.clip(Y, 1e-300, None))
        for sid in dict.fromkeys(slide_of):
            own, other = slide_of == sid, slide_of != sid
            typical = np.nanmean(np.where(tiny[other], logY[other], np.nan), axis=0)  # per target, other slides
            rho = [spearmanr(logY[k, tiny[k]], typical[tiny[k]])[0]
                   for k in np.flatnonzero(own) if tiny[k].sum() >= 5 and np.isfinite(typical[tiny[k]]).all()]
            print(f"{sid}: agreement of the near-zero order with the other slides {np.nanmean(rho):+.3f} "
                  f"({len(rho)} spots)")
    '''),
    md('''
        What the metric sees: only the order within each spot, so any transform that keeps it (here a square root)
        scores exactly 1; the plain ranks do too. Collapsing the near-ties scores below 1 against the raw values: the
        difference is the order of the tiny values that it gives up.
    '''),
    code('''
        from hevisum.metrics import mean_spot_spearman
        from hevisum.training import scale_rank_targets

        print(f"per-spot Spearman of sqrt(Y) against Y:            {mean_spot_spearman(np.sqrt(Y), Y):.4f}")
        print(f"per-spot Spearman of plain ranks against Y:        {mean_spot_spearman(R, Y):.4f}")
        print(f"per-spot Spearman of collapsed ranks against Y:    {mean_spot_spearman(R_collapsed, Y):.4f}")
        target = scale_rank_targets(R)  # what the losses see (train.target = "rank"): ranks scaled to 0..1
        print(f"training targets: {target.shape}, range {target.min():.2f}..{target.max():.2f}")
        assert mean_spot_spearman(np.sqrt(Y), Y) > 0.9999 and mean_spot_spearman(R, Y) > 0.9999
        assert np.allclose(np.sort(R_collapsed, axis=1).sum(axis=1), Y.shape[1] * (Y.shape[1] + 1) / 2)  # 1..T
    '''),
    md('''
        **In the pipeline**: `hevisum preprocess` always writes `ranks.npy` beside `targets.npy`;
        `[targets] tie_tol` sets the near-tie tolerance (0, plain ranks, by default; `1e-6` collapses the tiny
        values) and `[train] target = "rank"` (default) or `"raw"` picks what the models are fitted to. Scores are
        always computed against the raw targets.
    '''),
]

# ------------------------------------------------------------------------------------------------ 06
NOTEBOOKS["06_pitch_and_tiling"] = [
    md('''
        # 06 · Spot pitch and tiling

        The spot pitch (centre-to-centre distance) sets the scale. A tile of **3 pitches** around each spot shows the
        spot and its neighbours' context; its **3 × 3 subtiles** are one pitch each, and the centre one (index 4) is
        the spot itself. The reference CNN reads all three: the tile, the nine subtiles, the centre subtile.

        The reference measured the mean nearest-neighbour distance (25 px), cut 78-px tiles and stored one pickled
        file per spot. hevisum takes the median nearest-neighbour distance (robust to missing spots), resamples
        every tile to the model input size (78 px by default), and writes all tiles into **one uint8 `.npy` array**
        that is memory-mapped: opened instantly, read batch by batch, never loaded whole.
    '''),
    DATA_CELL,
    setup_cell("nb06"),
    code('''
        from hevisum.config import PreprocessConfig
        from hevisum.preprocess import spot_pitch
        from hevisum.preprocess.tiles import tile_side

        cfg = PreprocessConfig()
        pd.DataFrame([{"slide": s.slide_id, "pitch px": spot_pitch(s.xy),
                       "tile side px": tile_side(spot_pitch(s.xy), cfg.tiles.scale),
                       "model input px": cfg.tiles.size} for s in slides]).set_index("slide").round(2)
    '''),
    code('''
        from hevisum.preprocess import preprocess

        prep = preprocess(slides, cfg, WORK / "prep", progress=False)  # stain, mask, realign, drop, tile
        size_mb = (prep.workdir / "tiles.npy").stat().st_size / 1e6
        print(prep.summary())
        print(f"tile cache: {type(prep.tiles).__name__} {prep.tiles.shape} {prep.tiles.dtype}, {size_mb:.1f} MB on disk")
        prep.spots.head()  # row i of spots.csv describes tile i
    '''),
    md('''
        One tile with its 3 × 3 grid, and the nine subtiles `subtiles()` cuts from it (index 4 is the centre). Indexing
        the memory-mapped cache reads only the rows asked for.
    '''),
    code('''
        from hevisum.preprocess import subtiles

        rows = prep.rows(split="train")
        batch = prep.tiles[rows[:64]]  # fancy indexing copies just these 64 tiles into memory
        sub = subtiles(batch)  # (B, 9, S/3, S/3, 3)
        print("batch", batch.shape, "-> subtiles", sub.shape)
        b = int(np.argmin((batch > 235).all(axis=-1).mean(axis=(1, 2))))  # the tile with the least background
        tile, s3 = batch[b], batch.shape[1] // 3
        fig = plt.figure(figsize=(9, 3.8))
        grid = fig.add_gridspec(3, 7, wspace=0.1, hspace=0.3)
        ax = fig.add_subplot(grid[:, :3])
        ax.imshow(tile)
        for k in (1, 2):
            ax.axhline(k * s3 - 0.5, color="black", lw=1)
            ax.axvline(k * s3 - 0.5, color="black", lw=1)
        ax.set_title(f"tile of spot {prep.spots.spot_id[rows[b]]} ({prep.spots.slide[rows[b]]})", fontsize=9)
        ax.set_axis_off()
        for k in range(9):
            a = fig.add_subplot(grid[k // 3, 4 + k % 3])
            a.imshow(sub[b, k])
            a.set_title(f"{k}" + (" (centre)" if k == 4 else ""), fontsize=8)
            a.set_axis_off()
    '''),
    md('''
        A spot at the image border still gets a full tile: the parts beyond the image repeat the edge pixels (the
        reference padded the same way). To see it on tissue, take a piece of a slide whose border cuts through tissue,
        and a spot in its corner.
    '''),
    code('''
        from hevisum.preprocess.tiles import extract_tiles

        from scipy import ndimage as ndi

        from hevisum.preprocess import tissue_mask

        s = slides[0]
        side = tile_side(spot_pitch(s.xy), cfg.tiles.scale)
        # a piece of 4 tile sides around the densest tissue: its border runs through tissue
        density = ndi.uniform_filter(tissue_mask(s.image).astype(np.float32), 4 * side, mode="constant")
        cy, cx = np.unravel_index(int(np.argmax(density)), density.shape)
        piece = s.image[max(cy - 2 * side, 0):cy + 2 * side, max(cx - 2 * side, 0):cx + 2 * side]
        corner = extract_tiles(piece, np.array([[3.0, 3.0]]), side, cfg.tiles.size)[0]
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
        axes[0].imshow(piece)
        axes[0].add_patch(plt.Rectangle((3 - side / 2, 3 - side / 2), side, side, fill=False, ec="yellow", lw=1.5))
        axes[0].set_title("piece of a slide, corner spot's tile (yellow)", fontsize=8)
        axes[1].imshow(corner)
        axes[1].set_title("that tile: edge pixels repeat beyond the border", fontsize=8)
        for ax in axes:
            ax.set_axis_off()
    '''),
    code('''
        from hevisum.models import normalise_uint8, split_subtiles

        # what the CNN's subtile branches see: the same 3 x 3 cut, on normalised (B, C, H, W) tensors
        x = normalise_uint8(batch[:4])
        t = split_subtiles(x)
        print("model input", tuple(x.shape), "-> subtiles", tuple(t.shape))
        # the numpy and torch cuts agree: subtile k of the model is subtile k of the cache
        assert np.allclose(t.numpy(), normalise_uint8(sub[:4].reshape(-1, s3, s3, 3)).numpy().reshape(t.shape))
    '''),
    md('''
        **In the pipeline**: `[tiles] scale = 3.0` (tile side in pitches), `size = 78` (model input; 224 for ImageNet
        encoders at full size), `pitch_px = 0` (measure per slide, or set it). The cache lives in the work folder as
        `tiles.npy` + `spots.csv`; `hevisum.preprocess.load_prepared(folder)` opens it again without recomputing.
    '''),
]

# ------------------------------------------------------------------------------------------------ 07
SMALL_SPEC = "DemoSpec(seed=0, n_spots=120)"
SMALL_ABOUT = "4 training slides + 1 test slide, ~120 spots each: small enough to train on a CPU in seconds"

NOTEBOOKS["07_loso_training"] = [
    md('''
        # 07 · Leave-one-slide-out training

        What matters is the score on a slide the model never saw. **Leave-one-slide-out** (LOSO) cross-validation
        measures exactly that: for each training slide, fit on the others and predict it. Every training spot then
        has one **out-of-fold** (OOF) prediction, from the model that never saw its slide, and their mean per-spot
        Spearman estimates the score on a new slide. The fold models also predict the test slide; the rank-average
        of their predictions is the test prediction.

        Every method is a class in one registry, `hevisum.methods`: `get_method(name)` finds it, `method_names()`
        lists them. A method declares the per-tile features it reads, fits on training rows and predicts any rows.
        Methods compared here:
        * `mean`: the training mean profile for every spot, the floor any model must beat;
        * `colour-ridge`: ridge regression on colour, stain and texture statistics of the tile (no network);
        * `encoder-ridge`: ridge on the features of a frozen, ImageNet-pretrained EfficientNet-Lite0 (the mean and
          standard deviation of every stage's output beside its final embedding) plus the colour statistics of
          `colour-ridge`. The fast profile of `hevisum run` runs it beside `encoder-mlp`. Features are computed
          once per tile and cached.

        At the end, a few epochs of the reference CNN on one fold, on a subset of spots, to show its training loop.
    '''),
    DATA_CELL,
    setup_cell("nb07", SMALL_SPEC, SMALL_ABOUT),
    code('''
        from hevisum.config import load_run_config
        from hevisum.cv import fit_targets, make_folds
        from hevisum.preprocess import preprocess

        cfg = load_run_config(profile="fast", seed=0)  # the defaults of `hevisum run`
        prep = preprocess(slides, cfg.preprocess_config(), WORK / "prep", progress=False)
        print(prep.summary())
        folds = make_folds(prep.spots, seed=cfg.seed)
        Y_raw = np.asarray(prep.targets)  # what the score compares with
        Y_fit = fit_targets(Y_raw, prep.ranks, cfg)  # what the models are fitted to: per-spot ranks scaled to 0..1
        pd.Series(folds.slides).value_counts(sort=False).rename("training spots").to_frame()
    '''),
    md('''
        The registry: every method `hevisum run` can cross-validate, what it reads (feature blocks, the tiles
        themselves, or nothing) and whether it is a baseline that every run reports.
    '''),
    code('''
        from hevisum.methods import baseline_names, get_method, method_names


        def reads(name):
            cls = get_method(name)
            return "tiles" if cls.uses_tiles else " + ".join(f.label() for f in cls(cfg).features()) or "-"


        pd.DataFrame([{"method": n, "baseline": n in baseline_names(), "reads": reads(n),
                       "what it is": get_method(n).summary} for n in method_names()]).set_index("method")
    '''),
    md('''
        Cross-validation of each method, as `hevisum run` does it. `feature_store` computes the feature blocks a
        method declares once per tile (cached in the work folder) and `for_method` puts them side by side;
        `cross_validate_method` fits one model per fold and saves it to its folder as it goes. The predictions are
        then smoothed over neighbouring spots of the same slide (`[smoothing]`, on by default) and scored.
    '''),
    code('''
        from hevisum.cv import cross_validate_method, summarise
        from hevisum.methods import FitContext
        from hevisum.names import safe_name
        from hevisum.pipeline import feature_store
        from hevisum.postprocess import smooth_rows

        METHODS = [*baseline_names(), "encoder-ridge"]  # mean, colour-ridge, then the frozen encoder + ridge
        store = feature_store(prep, cfg, "cpu", False)
        # what a method may use besides its features: tiles and targets of every row (tile models), device, seed
        ctx = FitContext(cfg=cfg, tiles=prep.tiles, Y_fit=Y_fit, Y_raw=Y_raw, device="cpu", seed=cfg.seed)
        Yr, Yf = Y_raw[folds.train_rows], Y_fit[folds.train_rows]  # the training rows, in OOF order


        def fold_dir(name, held):
            return WORK / "models" / name / f"fold_{safe_name(held)}"  # the run folder's layout


        results, summaries, features = {}, {}, {}
        for name in METHODS:
            features[name] = store.for_method(get_method(name)(cfg))  # (tiles, features); None for mean
            r = cross_validate_method(name, folds, Y_fit, cfg, ctx, features=features[name],
                                      fold_dir=lambda held, n=name: fold_dir(n, held), target_names=prep.target_names)
            r.oof = smooth_rows(r.oof, folds.train_rows, prep.spots, cfg)
            r.test_folds = [smooth_rows(p, folds.test_rows, prep.spots, cfg) for p in r.test_folds]
            results[name], summaries[name] = r, summarise(name, r.oof, Yr, folds.slides, prep.target_names, Yf)
            print(f"{name}: features {'none' if features[name] is None else features[name].shape}")
        scores = pd.DataFrame({n: {**s["cv_fold_spot_spearman"], "all OOF spots": s["cv_spot_spearman"]}
                               for n, s in summaries.items()})
        scores.index.name = "held-out slide"
        scores.round(3)
    '''),
    md('''
        Every OOF prediction comes from the one fold model that did not train on that spot's slide. The fold models
        were saved as `hevisum run` saves them (`model.safetensors` + `model.json` in `models/<method>/fold_<slide>/`),
        and each describes itself: `load_model` reads one back with the slides it was trained on and its
        parameters (for the ridge heads, the penalty chosen by leave-one-slide-out inside the fold).
    '''),
    code('''
        from hevisum.methods import load_model

        r = results["encoder-ridge"]
        assert not np.isnan(r.oof).any()  # each training spot got its one out-of-fold prediction
        saved = [load_model(fold_dir("encoder-ridge", held)) for held in folds.slide_ids]
        assert all(held not in m.train_slides for m, held in zip(saved, folds.slide_ids))
        # the saved model predicts exactly what the fitted one did
        rows = folds.train_rows[folds.split(folds.slide_ids[0])[1]]
        X = features["encoder-ridge"][rows]
        assert np.allclose(saved[0].method.predict(X, rows=rows, ctx=ctx), r.models[0].predict(X, rows=rows, ctx=ctx))
        pd.DataFrame({"held-out slide": folds.slide_ids,
                      "fold model trained on": [", ".join(m.train_slides) for m in saved],
                      "ridge penalty": [m.method.params["alpha"] for m in saved]}).set_index("held-out slide")
    '''),
    md('''
        Cross-validated scores (bars, dots = held-out slides) beside the test slide's score (diamond) when its truth
        is known: for the demo it is, and the two should agree roughly. The test truth is for looking only; methods
        are chosen by cross-validation.
    '''),
    code('''
        from hevisum.metrics import evaluate_frames
        from hevisum.outputs import prediction_frame
        from hevisum.report.plots import methods_bar

        test = None
        if TRUTH.is_file() and len(folds.test_rows):
            truth = pd.read_csv(TRUTH)
            test_spots = prep.spots.iloc[folds.test_rows]
            test = {n: evaluate_frames(prediction_frame(test_spots, r.test_ensemble), truth) for n, r in results.items()}
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        methods_bar(ax, summaries, test, baselines=baseline_names())
        fig.tight_layout()
    '''),
    code('''
        from hevisum.report.plots import spatial_map
        from scipy.stats import rankdata

        # one held-out slide: true and out-of-fold predicted values of the most variable target, as ranks over spots
        held = folds.slide_ids[0]
        m = folds.slides == held
        xy = prep.spots.iloc[folds.train_rows[m]][["x", "y"]].to_numpy(float)
        j = int(np.argmax(Y_raw[folds.train_rows].std(axis=0)))
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        spatial_map(axes[0], None, xy, rankdata(Y_raw[folds.train_rows[m], j]) / m.sum(), f"{held}: true {prep.target_names[j]}", 0, 1)
        for ax, name in zip(axes[1:], ["colour-ridge", "encoder-ridge"]):
            spatial_map(ax, None, xy, rankdata(results[name].oof[m, j]) / m.sum(), f"out-of-fold {name}", 0, 1)
        fig.tight_layout()
    '''),
    md('''
        ### The reference CNN, briefly

        `hevisum-cnn` is the reference's `VisionMLP_MultiTask` (tile, subtile and centre-subtile branches, about
        6.7 M parameters). It reads the tiles rather than features, and its `fit` follows the reference's recipe:
        AdamW, cosine decay, the hybrid MSE / Pearson loss on rank targets, early stopping on the per-spot Spearman
        of an inner validation split of the fitting spots (`hevisum.training.inner_validation`, never the held-out
        slide); the per-epoch log ends up in `method.log`. Here: one fold, two epochs of a 160-spot subset each,
        enough to see the loop work, far too little to judge the model (expect a score below the ridge heads).
        `hevisum run --profile reference` trains it properly (30 epochs, every fold; a GPU helps).
    '''),
    code('''
        TRAIN_CNN = True  # set to False to skip (about 10-20 s on a 2-core CPU)
    '''),
    code('''
        if TRAIN_CNN:
            from dataclasses import replace

            from hevisum.metrics import mean_spot_spearman
            from hevisum.models import create_model
            from hevisum.report.plots import loss_curves
            from hevisum.training import inner_validation

            short = replace(cfg, train=replace(cfg.train, epochs=2, max_spots_per_epoch=160, num_workers=0))
            held = folds.slide_ids[0]
            fit_mask, held_mask = folds.split(held)
            fit_rows, held_rows = folds.train_rows[fit_mask], folds.train_rows[held_mask]
            print(f"{sum(p.numel() for p in create_model('hevisum-cnn', Y_fit.shape[1]).parameters()):,} parameters; "
                  f"early stopping watches {int(inner_validation(len(fit_rows), ctx.seed).sum())} "
                  f"of the {len(fit_rows)} fitting spots")
            cnn = get_method("hevisum-cnn")(short).fit(None, Y_fit[fit_rows], rows=fit_rows,
                                                       groups=folds.slides[fit_mask], ctx=ctx)
            pred = smooth_rows(cnn.predict(None, rows=held_rows, ctx=ctx), held_rows, prep.spots, cfg)  # smoothed like the CV
            score = mean_spot_spearman(pred, Y_raw[held_rows])
            print(f"held-out {held}: CNN after {len(cnn.log)} short epochs {score:.3f}; "
                  f"encoder-ridge {summaries['encoder-ridge']['cv_fold_spot_spearman'][held]:.3f}; "
                  f"mean profile {summaries['mean']['cv_fold_spot_spearman'][held]:.3f}")
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
            loss_curves(a1, a2, {f"fold {held}": cnn.log})
            fig.tight_layout()
    '''),
    md('''
        **In the pipeline**: `[models] methods = ["encoder-ridge", "encoder-mlp"]` (the fast profile's choice when
        the list is empty; the baselines `mean` and `colour-ridge` always run too; `hevisum methods` lists every
        registered method, among them `encoder-probe`, the HEST-Benchmark probe: PCA to 256 components + ridge).
        `[encoder]` names the frozen encoder and `input_px = 112`, the side it sees; `[smoothing]` the neighbour
        smoothing; `[train]` holds epochs, batch size, learning rate, loss, augmentation and test-time augmentation
        for the tile models (`hevisum-cnn`, `effnet-finetune`). `hevisum run` saves every fold model under
        `models/<method>/fold_<slide>/` and the OOF predictions as `oof_<method>.csv`.
    '''),
]

# ------------------------------------------------------------------------------------------------ 08
NOTEBOOKS["08_stacking"] = [
    md('''
        # 08 · Stacking on out-of-fold predictions

        A stacker is a second model that combines the predictions of several first-level models. It must be fitted on
        predictions that look like the ones it will get for a new slide: **out-of-fold** predictions (07), each made by
        a model that never saw the spot's slide.

        The reference fed its stacker each fold model's predictions on the training spots, spots that 5 of its 6 models
        had trained on. Those predictions are better than anything the models produce on a new slide, so the stacker
        learns to trust them too much, and its validation (a random 80/20 split of those same spots) reports a
        score it will not reach. This notebook builds both and compares them.
    '''),
    DATA_CELL,
    setup_cell("nb08", SMALL_SPEC, SMALL_ABOUT),
    md('''
        First the methods of 07, cross-validated leave-one-slide-out. The neighbour smoothing of 07 (which
        `hevisum run` applies) is switched off here, so that both stackers below combine the models' own predictions
        and differ only in the leak.
    '''),
    code('''
        from hevisum.config import load_run_config
        from hevisum.cv import cross_validate_method, fit_targets, make_folds
        from hevisum.methods import FitContext, baseline_names, get_method
        from hevisum.pipeline import feature_store
        from hevisum.preprocess import preprocess

        cfg = load_run_config(profile="fast", seed=0, overrides={"smoothing": {"enabled": False}})
        prep = preprocess(slides, cfg.preprocess_config(), WORK / "prep", progress=False)
        folds = make_folds(prep.spots, seed=cfg.seed)
        Y_raw = np.asarray(prep.targets)
        Y_fit = fit_targets(Y_raw, prep.ranks, cfg)
        Yr, Yf = Y_raw[folds.train_rows], Y_fit[folds.train_rows]  # training rows only
        store = feature_store(prep, cfg, "cpu", False)
        ctx = FitContext(cfg=cfg, tiles=prep.tiles, Y_fit=Y_fit, Y_raw=Y_raw, device="cpu", seed=cfg.seed)
        results, features = {}, {}
        for name in [*baseline_names(), "encoder-ridge"]:  # as in 07: leave-one-slide-out, OOF predictions
            features[name] = store.for_method(get_method(name)(cfg))
            results[name] = cross_validate_method(name, folds, Y_fit, cfg, ctx, features=features[name])
    '''),
    md('''
        ### The leak-free stacker

        Its inputs are each method's OOF per-spot ranks, side by side. Its own score comes from a second
        leave-one-slide-out over those OOF rows (**nested**): the stacker that scores slide *s* never saw *s*'s rows.
        The stacker is a registered method too (`stacker_name()`, `stacking`): a ridge by default
        (`[stacking] model`), its penalty chosen by leave-one-slide-out.
    '''),
    code('''
        from hevisum.cv import cross_validate_stacking, stack_inputs, stack_test_inputs
        from hevisum.metrics import evaluate_frames, mean_spot_spearman
        from hevisum.outputs import prediction_frame

        methods = list(results.values())
        X_oof = stack_inputs(methods)  # (training spots, methods x T)
        X_test = stack_test_inputs(methods)  # each method's rank-average over its fold models, on the test spots
        st = cross_validate_stacking(X_oof, Yf, folds.slides, X_test, cfg, [r.name for r in methods], seed=cfg.seed)
        print(f"{st.final.name} ({st.final.params['kind']}) over {', '.join(st.final.params['methods'])}: "
              f"{X_oof.shape[1]} inputs per spot")

        truth = pd.read_csv(TRUTH) if TRUTH.is_file() and len(folds.test_rows) else None


        def test_score(pred):
            """Per-spot Spearman on the test slide when its truth is known (for looking only, never for choosing)."""
            if truth is None:
                return np.nan
            frame = prediction_frame(prep.spots.iloc[folds.test_rows], pred)
            return evaluate_frames(frame, truth)["overall"]["spot_spearman"]


        table = pd.DataFrame({
            **{n: {"CV per-spot Spearman": mean_spot_spearman(r.oof, Yr), "test": test_score(r.test_ensemble)}
               for n, r in results.items()},
            "stacking (OOF, nested CV)": {"CV per-spot Spearman": mean_spot_spearman(st.oof, Yr), "test": test_score(st.test)},
        }).T
        table.round(3)
    '''),
    md('''
        ### The leak, rebuilt

        The reference's inputs: every fold model's predictions on every training spot. For a spot of slide *s*, all
        fold models but one trained on it. First, how much better the models look on spots they trained on:
    '''),
    code('''
        from hevisum.cv import spot_ranks

        gap = {}
        for name in ["colour-ridge", "encoder-ridge"]:
            r, X = results[name], features[name]
            for fm, held in zip(r.models, folds.slide_ids):  # the fold models, in folds.slide_ids order
                fit_mask, held_mask = folds.split(held)
                seen = folds.train_rows[fit_mask]
                gap[(name, held)] = {
                    "on its training spots": mean_spot_spearman(fm.predict(X[seen], rows=seen, ctx=ctx), Yr[fit_mask]),
                    "on the held-out slide": mean_spot_spearman(r.oof[held_mask], Yr[held_mask])}
        pd.DataFrame(gap).T.round(3)
    '''),
    code('''
        from hevisum.methods import stacker_name


        def fold_model_inputs(rows):
            """The reference's stacker inputs: every fold model of every method on ``rows``, ranks side by side."""
            return np.concatenate([spot_ranks(fm.predict(features[n][rows], rows=rows, ctx=ctx))
                                   for n in ["colour-ridge", "encoder-ridge"] for fm in results[n].models], axis=1)


        X_leaky = fold_model_inputs(folds.train_rows)  # in-sample for all but one fold model
        val = np.random.default_rng(cfg.seed).random(len(X_leaky)) < 0.2  # the reference's random 80/20 split of spots
        # the same stacker, fitted the reference's way: in-sample inputs, and no slides (groups=None) for its penalty
        leaky = get_method(stacker_name())(cfg).fit(X_leaky[~val], Yf[~val], rows=np.flatnonzero(~val), groups=None,
                                                    ctx=ctx)
        leaky_val = mean_spot_spearman(leaky.predict(X_leaky[val], rows=np.flatnonzero(val), ctx=ctx), Yr[val])
        leaky_test = (test_score(leaky.predict(fold_model_inputs(folds.test_rows), rows=folds.test_rows, ctx=ctx))
                      if len(folds.test_rows) else np.nan)
        print(f"leaky stacker: its own validation {leaky_val:.3f}, test slide {leaky_test:.3f}")
        print(f"OOF stacker:   nested CV          {table.loc['stacking (OOF, nested CV)', 'CV per-spot Spearman']:.3f}, "
              f"test slide {table.loc['stacking (OOF, nested CV)', 'test']:.3f}")
    '''),
    code('''
        bars = {"leaky: own validation": leaky_val, "leaky: test slide": leaky_test,
                "OOF: nested CV": table.loc["stacking (OOF, nested CV)", "CV per-spot Spearman"],
                "OOF: test slide": table.loc["stacking (OOF, nested CV)", "test"]}
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.bar(range(4), list(bars.values()), color=["#d62728", "#f4a6a6", "#3f6fb5", "#a9c1e6"])
        ax.set_xticks(range(4), list(bars), rotation=15, fontsize=8)
        ax.set_ylabel("mean per-spot Spearman")
        ax.set_ylim(0, 1)
        ax.set_title("what each stacker promises (dark) and delivers (light)", fontsize=9)
        fig.tight_layout()
    '''),
    code('''
        # the point of this notebook, checked: the leaky validation promises more than the honest nested estimate,
        # and (when the test truth is known) more than the leaky stacker delivers on the test slide
        assert leaky_val > bars["OOF: nested CV"]
        if np.isfinite(leaky_test):
            assert leaky_val > leaky_test
    '''),
    md('''
        The random 80/20 split adds a second leak: neighbouring spots of one slide, nearly alike, fall on both sides.
        Whole slides must be held out.

        **In the pipeline**: `[stacking] enabled = true`, `model = "ridge"` (or `"mlp"`, the reference's
        `StackingMLP`). `hevisum run` stacks every cross-validated method on OOF predictions (smoothed, as in 07),
        scores the stacker with the nested leave-one-slide-out, saves it under `models/stacking/`, and selects it
        only when it beats the best single method by more than the fold-to-fold noise (the mean of its per-fold
        gains must exceed their standard error).
    '''),
]

# ------------------------------------------------------------------------------------------------ 09
NOTEBOOKS["09_evaluation_and_report"] = [
    md('''
        # 09 · Evaluation and the run report

        The competition metric: for each spot, the Spearman correlation between the predicted and the true target
        vector; the score is the mean over spots. `hevisum.metrics` also reports per-target Spearman and Pearson
        (across spots; how well one cell type's map is recovered) and the MSE. Then the whole job, `run_pipeline`
        (what `hevisum run` calls), end to end, and a look at its report.
    '''),
    DATA_CELL,
    setup_cell("nb09", SMALL_SPEC, SMALL_ABOUT),
    code('''
        from hevisum import metrics

        Y = np.concatenate([s.targets for s in train])
        rng = np.random.default_rng(0)
        noisy = Y * np.exp(rng.normal(0.0, 1.0, Y.shape))  # the right tendencies, with a lot of noise
        candidates = {
            "noisy": noisy,
            "noisy ** 3 (same order per spot)": noisy ** 3,
            "mean profile": np.tile(Y.mean(axis=0), (len(Y), 1)),
            "truth": Y,
        }
        rows = {}
        for name, pred in candidates.items():
            s = metrics.score(pred, Y)
            rows[name] = {k: s[k] for k in ["spot_spearman", "n_undefined", "target_spearman_mean",
                                            "target_pearson_mean", "n_undefined_targets", "mse"]}
        pd.DataFrame(rows).T
    '''),
    md('''
        * Cubing changes the values but not the order within a spot: per-spot Spearman is unchanged, MSE and
          per-target Pearson are not.
        * The mean profile predicts the same vector everywhere. Per spot it is still ranked, so it gets a per-spot
          score (the floor every model must beat); across spots each of its columns is constant, so every per-target
          correlation is undefined (NaN, counted in `n_undefined_targets`, left out of the means).
    '''),
    code('''
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for name in ["noisy", "mean profile"]:
            ax.hist(metrics.per_spot_spearman(candidates[name], Y), bins=40, alpha=0.6, label=name)
        ax.set_xlabel("per-spot Spearman")
        ax.set_ylabel("spots")
        ax.legend(fontsize=8)
        fig.tight_layout()
        assert metrics.mean_spot_spearman(noisy ** 3, Y) == metrics.mean_spot_spearman(noisy, Y)
    '''),
    md('''
        Tables are joined on `(slide, ID)`, never on row order: a shuffled prediction file scores the same.
    '''),
    code('''
        ids = pd.DataFrame({"slide": np.concatenate([[s.slide_id] * s.n_spots for s in train]),
                            "ID": np.concatenate([s.spot_ids for s in train])})
        cols = [f"C{j + 1}" for j in range(Y.shape[1])]
        truth_frame = pd.concat([ids, pd.DataFrame(Y, columns=cols)], axis=1)
        pred_frame = pd.concat([ids, pd.DataFrame(noisy, columns=cols)], axis=1).sample(frac=1.0, random_state=0)
        result = metrics.evaluate_frames(pred_frame, truth_frame)
        print(f"overall {result['overall']['spot_spearman']:.4f};",
              ", ".join(f"{k} {v['spot_spearman']:.4f}" for k, v in result["per_slide"].items()))
        assert abs(result["overall"]["spot_spearman"] - metrics.mean_spot_spearman(noisy, Y)) < 1e-12
    '''),
    md('''
        ### The whole job

        `run_pipeline` preprocesses, cross-validates every method (leave-one-slide-out), stacks on out-of-fold
        predictions, **selects by cross-validation only**, predicts the test slide, scores it when its truth is given,
        and writes a run folder with `report.html`; it returns the content of the run's `metrics.json`
        (`hevisum.pipeline.run` does the same and returns a typed `RunResult` instead). Here with `encoder-ridge` as
        the only method beside the baselines, to keep it quick; by default `hevisum run` (the fast profile) runs
        `encoder-ridge` and `encoder-mlp`. The output folder must be new, empty or an earlier hevisum run folder
        (marked by its `.hevisum-run.json`): nothing else is ever overwritten.
    '''),
    code('''
        from hevisum.pipeline import run_pipeline

        config = WORK / "run.toml"
        config.write_text('profile = "fast"\\nseed = 0\\n\\n[models]\\nmethods = ["encoder-ridge"]\\n\\n'
                          '[stacking]\\nmodel = "ridge"\\n')
        RUN = WORK / "run"
        run_metrics = run_pipeline([str(H5)], RUN, config_path=str(config),
                                   truth=str(TRUTH) if TRUTH.is_file() else None, device="cpu", progress=False)
        test = run_metrics.get("test", {})
        summary = pd.DataFrame({name: {"CV per-spot Spearman": s["cv_spot_spearman"],
                                       "CV per-target Pearson": s["cv_target_pearson_mean"],
                                       "test per-spot Spearman": test.get(name, {}).get("overall", {}).get("spot_spearman")}
                                for name, s in run_metrics["methods"].items()}).T
        sel = run_metrics["selection"]
        print(f"selected by cross-validation: {sel['selected']} (best single method {sel['best_single']}, "
              f"best baseline {sel['best_baseline']}); {run_metrics['seconds']:.0f} s")
        if sel["stack_margin"] is not None:
            print(f"stacking over the best single method: {sel['stack_margin']:+.4f} per fold, "
                  f"standard error {sel['stack_noise']:.4f} (chosen only when the gain exceeds it)")
        summary.round(3)
    '''),
    code('''
        print("run folder:", RUN)
        print("\\n".join(sorted(str(p.relative_to(RUN)) for p in RUN.iterdir())))
        print(f"\\nopen {RUN / 'report.html'} in a browser for the whole report")
    '''),
    md('''
        `report.html` is one self-contained page (its figures embedded, and saved under `figures/` too). Some of
        them: the methods beside the baselines (dots: held-out slides; diamond: test slide), the per-target Pearson
        of the selected method, and the section of one held-out training slide: its H&E with the spots, the
        per-spot Spearman of every spot, and for the most variable targets the truth (top) above the selected
        method's out-of-fold prediction (bottom).
    '''),
    code('''
        from IPython.display import Image, display

        figures = sorted((RUN / "figures").glob("*.png"))
        for name in ["methods.png", "per_target.png"]:
            display(Image(filename=str(RUN / "figures" / name)))
        display(Image(filename=str(next(p for p in figures if p.name.startswith("map_")))))
    '''),
    md('''
        The submission files follow the competition format (`ID, C1..Cn`, one row per test spot in file order), and
        `hevisum evaluate predictions.csv truth.csv` scores any prediction file the same way:
    '''),
    code('''
        subs = sorted(RUN.glob("submission_*.csv"))
        print(", ".join(p.name for p in subs))
        if TRUTH.is_file() and subs:
            ev = metrics.evaluate_files(RUN / "predictions.csv", TRUTH)
            print(f"predictions.csv against {TRUTH.name}: per-spot Spearman {ev['overall']['spot_spearman']:.4f}")
            assert abs(ev["overall"]["spot_spearman"]
                       - run_metrics["test"][run_metrics["selected"]]["overall"]["spot_spearman"]) < 1e-9
        pd.read_csv(subs[0]).head() if subs else None
    '''),
]


# ------------------------------------------------------------------------------------------------ writing


def build(name: str, cells: list[Cell]):
    """The notebook ``name`` as an nbformat node: no outputs, no execution counts, stable cell ids."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    first_code = True
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        # deterministic ids: rebuilding an unchanged notebook changes no byte
        cell["id"] = f"{name[:2]}-{i:02d}"
        if kind == "code" and first_code:
            cell.metadata["tags"] = [PARAMETERS_TAG]
            first_code = False
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The notebook's file content, exactly as written to disk."""
    import nbformat

    return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the notebooks, or with --check report those that differ from this source."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook differs")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
