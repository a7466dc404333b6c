"""`hevisum explain RUN_DIR INPUT --out DIR`: integrated-gradients attributions of a finished run's predictions
to the pixels of the spot tiles, written as overlays (tile and slide) with a completeness table.

INPUT is preprocessed exactly as `hevisum predict` does (the run's config and stain target) in a temporary work
folder, then one method of the run is explained (the selected one unless ``method`` names another):

* tile networks (``hevisum-cnn``, ``effnet-finetune``): every fold model is attributed on its own
  (:func:`hevisum.explain.tile_model_forward`) and the attributions are averaged over the fold models. The run's
  prediction is a rank-average of the fold models' outputs; what is explained is each fold model's output.
* ridge heads on frozen encoder features (``encoder-ridge``, ``encoder-probe``): the chain pixels → encoder →
  per-slide z-score (the slide's statistics held constant) → the ridge's linear map on the encoder columns
  (:func:`hevisum.explain.feature_head_forward`). Every fold model has the same chain up to its linear map, so
  the chain uses the mean of the fold models' maps, which gives exactly the mean of their attributions. Blocks
  after the encoder's own (colour statistics, neighbour/slide/wide context, coordinates) are left out of the
  chain: the explained output is the encoder block's contribution to the prediction (plus the intercept).

Everything is computed in float32, the heads' linear maps in float64 (a run with ``train.precision`` ``auto``
predicts in bfloat16 on a CPU), so the differentiable forwards reproduce the method's outputs to rounding;
``forward_check_max_abs_error`` in explain.json records how closely.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hevisum.errors import HevisumError

#: Defaults of the command line.
DEFAULT_N_SPOTS = 4
DEFAULT_N_TARGETS = 2
DEFAULT_RTOL = 0.05
#: White is empty glass (and the background fill of the tiles): "what in this tissue, compared with no tissue".
DEFAULT_BASELINE = "white"
TILE_KIND = "tile network"
HEAD_KIND = "encoder features + ridge head"


# --------------------------------------------------------------------------------------------- what to explain


def _ridge_state(method) -> tuple[dict, dict]:
    """(RidgeHead state, PCA arrays) of a ridge head method, or raise KeyError."""
    t = method.tensors
    if "pca_components" in t:
        head = {k[5:]: v for k, v in t.items() if k.startswith("head.")}
        pca = {"pca_mean": t["pca_mean"], "pca_components": t["pca_components"]}
    else:
        head, pca = t, {}
    for k in ("x_mean", "x_scale", "coef", "intercept"):
        if k not in head:
            raise KeyError(k)
    return head, pca


def explainable_kind(method) -> str | None:
    """:data:`TILE_KIND`, :data:`HEAD_KIND`, or None when the method cannot be explained here."""
    if getattr(method, "stacker", False):
        return None
    if getattr(method, "uses_tiles", False):
        return TILE_KIND if hasattr(method, "_net") else None
    specs = method.features()
    if not specs or specs[0].source != "encoder" or specs[0].context or specs[0].geometry != "spot":
        return None
    try:
        _ridge_state(method)
    except KeyError:
        return None
    return HEAD_KIND


def _saved_methods(run_dir: Path) -> list[str]:
    root = run_dir / "models"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("fold_*/model.json"))) \
        if root.is_dir() else []


def saved_kind(run_dir: Path, name: str) -> str | None:
    """The kind (see :func:`explainable_kind`) of a saved method of the run, judged on its first fold model."""
    from hevisum.methods import load_model

    folders = sorted((run_dir / "models" / name).glob("fold_*"))
    if not folders:
        return None
    try:
        return explainable_kind(load_model(folders[0]).method)
    except HevisumError:
        return None


def _explainable_names(run_dir: Path) -> list[str]:
    return [n for n in _saved_methods(run_dir) if saved_kind(run_dir, n) is not None]


def _refuse(run_dir: Path, why: str) -> HevisumError:
    names = _explainable_names(run_dir)
    can = (f"methods of this run that can be explained: {', '.join(names)}; choose one with --method NAME"
           if names else "this run has no method that can be explained (tile networks hevisum-cnn, "
           "effnet-finetune; ridge heads encoder-ridge, encoder-probe)")
    return HevisumError(f"{why}; {can}")


def stacker_weights(run_dir: Path, metrics: dict) -> dict[str, float]:
    """Each stacked method's share of the ridge stacker's total |weight| (its block of input columns)."""
    from hevisum.explain import fold_ridge_head
    from hevisum.methods import load_model, stacker_name

    stacked = list(metrics.get("stack_methods") or [])
    st = load_model(run_dir / "models" / stacker_name()).method
    if st.params.get("kind", "ridge") != "ridge" or not stacked:
        return {}
    w, _ = fold_ridge_head(st.tensors)
    if w.shape[1] % len(stacked):
        return {}
    t = w.shape[1] // len(stacked)
    mags = {m: float(np.abs(w[:, i * t:(i + 1) * t]).sum()) for i, m in enumerate(stacked)}
    total = sum(mags.values()) or 1.0
    return {m: v / total for m, v in mags.items()}


def choose_method(run_dir: Path, metrics: dict, requested: str | None) -> tuple[str, str]:
    """(method name, why it was chosen) of the run's method to explain."""
    from hevisum.methods import canonical_name, get_method, stacker_name

    saved = _saved_methods(run_dir)
    if requested:
        name = canonical_name(requested)
        if get_method(name).stacker:  # an unknown name: a clear error listing the registered ones
            raise _refuse(run_dir, f"the {name} stacker combines other methods' predictions; explain one of them")
        if name not in saved:
            raise HevisumError(f"method {requested!r} has no saved fold models in {run_dir / 'models'}; "
                               f"saved methods: {', '.join(saved) or 'none'}")
        if saved_kind(run_dir, name) is None:
            raise _refuse(run_dir, f"method {name!r} cannot be explained (integrated gradients need a tile "
                          "network or a ridge head on the encoder's features)")
        return name, "--method"
    selected = metrics["selected"]
    if selected == stacker_name():
        weights = stacker_weights(run_dir, metrics)
        if not weights:
            raise _refuse(run_dir, f"the run's selected method is the {selected} stacker, whose weights do "
                          "not name one method to explain")
        best = max(weights, key=weights.get)
        if saved_kind(run_dir, best) is None:
            raise _refuse(run_dir, f"the run's selected method is the {selected} stacker and the method it "
                          f"weighs most, {best!r} ({weights[best]:.0%} of its weight), cannot be explained")
        return best, f"the stacker's most weighted method ({weights[best]:.0%} of its weight)"
    if saved_kind(run_dir, selected) is None:
        raise _refuse(run_dir, f"the run's selected method {selected!r} cannot be explained (integrated "
                      "gradients need a tile network or a ridge head on the encoder's features)")
    return selected, "the run's selected method"


def resolve_targets(spec: str | None, names: list[str], pred: np.ndarray,
                    n_default: int = DEFAULT_N_TARGETS) -> list[int]:
    """Target columns from ``"C3,C7"`` / names (exact name first, then ``C<k>``, 1-based); default the
    ``n_default`` targets whose predictions vary most over the spots."""
    if spec is None or not spec.strip():
        var = np.nanvar(np.asarray(pred, dtype=np.float64), axis=0) if len(pred) else np.zeros(len(names))
        order = np.argsort(-np.nan_to_num(var, nan=-1.0), kind="stable")
        return sorted(int(i) for i in order[:n_default])
    out: list[int] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in names:
            idx = names.index(item)
        else:
            m = re.fullmatch(r"[Cc](\d+)", item)
            if m is None or not 1 <= int(m.group(1)) <= len(names):
                shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
                raise HevisumError(f"unknown target {item!r}; give target names ({shown}) or columns C1..C{len(names)}")
            idx = int(m.group(1)) - 1
        if idx not in out:
            out.append(idx)
    if not out:
        raise HevisumError("--targets is empty; give target names or columns such as C1,C3")
    return out


def resolve_spots(spec: str | None, spots, pred: np.ndarray, targets: list[int], n_spots: int) -> np.ndarray:
    """Tile-cache rows of the spots to explain.

    ``spec``: comma-separated spot ids (``ID`` on any slide, or ``SLIDE:ID``). Default: on every slide, the
    ``n_spots`` spots with the most extreme predictions, taken in turn per target: its highest, its lowest, the
    next target's highest ... (each spot once).
    """
    slides = spots["slide"].astype(str).to_numpy()
    ids = spots["spot_id"].astype(str).to_numpy()
    if spec is not None and spec.strip():
        rows: list[int] = []
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                continue
            hit = np.flatnonzero(ids == item)
            if not hit.size and ":" in item:
                sl, sid = item.rsplit(":", 1)
                hit = np.flatnonzero((slides == sl) & (ids == sid))
            if not hit.size:
                raise HevisumError(f"spot {item!r} is not in the input; give spot ids (or SLIDE:ID) from the "
                                   f"input's spot tables, e.g. {slides[0]}:{ids[0]}")
            rows += [int(r) for r in hit if int(r) not in rows]
        if not rows:
            raise HevisumError("--spots is empty; give spot ids such as 0,12 or SLIDE:ID")
        return np.asarray(rows, dtype=np.int64)
    if n_spots < 1:
        raise HevisumError(f"--n-spots must be at least 1, got {n_spots}")
    rows = []
    for s in dict.fromkeys(slides.tolist()):
        idx = np.flatnonzero(slides == s)
        picked: list[int] = []
        queues = []
        for t in targets:
            order = idx[np.argsort(pred[idx, t], kind="stable")]
            queues += [list(order[::-1]), list(order)]  # highest first, then lowest first
        while len(picked) < min(n_spots, len(idx)):
            moved = False
            for q in queues:
                while q and q[0] in picked:
                    q.pop(0)
                if q and len(picked) < n_spots:
                    picked.append(int(q.pop(0)))
                    moved = True
            if not moved:
                break
        rows += sorted(picked)
    return np.asarray(rows, dtype=np.int64)


# --------------------------------------------------------------------------------------------- forwards


def _dihedral(x):
    """The 8 flips/rotations of an NHWC batch, as test-time augmentation makes them."""
    from hevisum.training import dihedral_views

    return dihedral_views(x)


@functools.lru_cache(maxsize=1)
def _module_classes():
    """(EncoderPixels, DihedralMean, Float64Head): torch modules, defined on first use so that importing this
    module does not import torch."""
    import torch.nn.functional as F
    from torch import nn

    class EncoderPixels(nn.Module):
        """NHWC pixels (0..255 floats) → the encoder's features, by the arithmetic of
        :func:`hevisum.encoders.encode_tiles` (scale to [0, 1], resize to the input size, ``Encoder.embed``),
        averaged over the 8 flips/rotations when the run used test-time augmentation."""

        def __init__(self, encoder, input_px: int, stages: bool, tta: bool) -> None:
            super().__init__()
            self.encoder, self.input_px, self.stages, self.tta = encoder, int(input_px), bool(stages), bool(tta)

        def one(self, pixels):
            x = pixels.permute(0, 3, 1, 2).float() / 255.0
            h, w = x.shape[-2:]
            px = self.input_px
            if (h, w) != (px, px):
                x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False, antialias=px < max(h, w))
            return self.encoder.embed(x, stages=self.stages).float()

        def forward(self, pixels):
            if not self.tta:
                return self.one(pixels)
            views = _dihedral(pixels)
            return sum(self.one(v) for v in views) / len(views)

    class DihedralMean(nn.Module):
        """A pixel forward averaged over the 8 flips/rotations of its input (test-time augmentation)."""

        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels):
            views = _dihedral(pixels)
            return sum(self.inner(v) for v in views) / len(views)

    from hevisum.explain import FeatureHeadForward

    class Float64Head(FeatureHeadForward):
        """:class:`~hevisum.explain.FeatureHeadForward` with its linear map in float64.

        The z-score stays in float32, the arithmetic of :func:`hevisum.features.standardise_per_slide`; the map,
        whose folded weights reach 1e4 for a PCA probe, is applied in float64 like the head's own prediction, so
        float32 rounding of the weights does not shift the output."""

        def forward(self, x):
            return self.features(x).double() @ self.weight.T + self.bias

    return EncoderPixels, DihedralMean, Float64Head


def float64_head(chain, weight: np.ndarray, bias: np.ndarray):
    """``chain`` (from :func:`hevisum.explain.feature_head_forward`, which checks the shapes) with its linear
    map replaced by the float64 ``weight`` (T, F) and ``bias`` (T,)."""
    import torch

    Float64Head = _module_classes()[2]
    w = torch.as_tensor(np.ascontiguousarray(weight, dtype=np.float64))
    b = torch.as_tensor(np.broadcast_to(np.asarray(bias, dtype=np.float64), (w.shape[0],)).copy())
    if tuple(w.shape) != tuple(chain.weight.shape):
        raise HevisumError(f"weight {tuple(w.shape)} does not match the chain's {tuple(chain.weight.shape)}")
    return Float64Head(chain.embed, chain.mean, chain.std, w, b).eval()


# --------------------------------------------------------------------------------------------- results


@dataclass
class Explained:
    """Attributions and numbers of (spot, target) pairs: ``pairs[i] = (tile index, target column)``."""

    attributions: np.ndarray  # (P, H, W, 3) float32, mean over the forwards (fold models)
    output: np.ndarray  # (P,) f(tile), mean over the forwards
    base_output: np.ndarray  # (P,) f(baseline)
    attr_sum: np.ndarray  # (P,) sum of the mean attributions
    fold_errors: np.ndarray  # (P,) max over the forwards of each one's relative completeness error
    steps: np.ndarray  # (P,) integration steps used
    forward_check: float = 0.0  # max |forward − the method's own output (less non-encoder blocks)|
    forward_check_rel: float = 0.0  # the same divided by max(1, |the fold models' outputs|)


def _rel(err: np.ndarray, diff: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(diff) > 0, np.abs(err) / np.abs(diff), np.nan)


def _outputs(forward, images: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """forward(images) (N, T) float64 for float or uint8 NHWC pixel images, without gradients."""
    import torch

    dev = torch.device(device)
    forward.to(dev).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size], dtype=np.float32)).to(dev)
            out.append(forward(x).double().cpu().numpy())
    forward.cpu()
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def attribute_pairs(forwards: list, tiles: np.ndarray, pairs: list[tuple[int, int]], *, steps: int,
                    baseline: str, rtol: float | None, max_steps: int, batch_size: int, device: str) -> Explained:
    """Integrated gradients of every forward (fold model) on every (tile, target) pair, averaged over the forwards.

    A pair whose relative completeness error, of the mean attributions or of any one forward's, exceeds ``rtol``
    is attributed again with twice the steps, until it passes or the steps would exceed ``max_steps``.
    """
    from hevisum.explain import integrated_gradients, make_baseline

    n, p = len(forwards), len(pairs)
    idx = np.asarray([k for k, _ in pairs], dtype=np.int64)
    tgt = np.asarray([t for _, t in pairs], dtype=np.int64)
    x = tiles[idx]
    base = make_baseline(x, baseline)
    fx = np.zeros((n, p))
    fb = np.zeros((n, p))
    for f, fwd in enumerate(forwards):
        fx[f] = _outputs(fwd, x, batch_size, device)[np.arange(p), tgt]
        fb[f] = _outputs(fwd, base, batch_size, device)[np.arange(p), tgt]
    attrs = np.zeros((n, *x.shape), dtype=np.float32)
    used = np.zeros(p, dtype=np.int64)
    todo, cur = np.arange(p), steps
    while todo.size:
        for f, fwd in enumerate(forwards):
            a, _ = integrated_gradients(fwd, x[todo], tgt[todo], baseline=base[todo], steps=cur,
                                        batch_size=batch_size, device=device)
            attrs[f, todo] = a
        used[todo] = cur
        sums = attrs.sum(axis=(2, 3, 4), dtype=np.float64)  # (n, P)
        fold_err = np.fmax.reduce(_rel(sums - (fx - fb), fx - fb), axis=0)  # NaN only where every one is
        mean_err = _rel(sums.mean(axis=0) - (fx - fb).mean(axis=0), (fx - fb).mean(axis=0))
        if rtol is None or 2 * cur > max_steps:
            break
        worst = np.fmax(fold_err, mean_err)
        todo = np.flatnonzero(worst > rtol)
        cur *= 2
    mean_attr = attrs.mean(axis=0)
    return Explained(mean_attr.astype(np.float32), fx.mean(axis=0), fb.mean(axis=0),
                     mean_attr.sum(axis=(1, 2, 3), dtype=np.float64), fold_err, used)


def explain_tile_models(models: list, tiles: np.ndarray, pairs: list[tuple[int, int]], method_out: np.ndarray,
                        *, tta: bool, **ig: Any) -> Explained:
    """Each fold model attributed on its own, then everything averaged over the fold models.
    ``method_out`` (n_folds, n_tiles, T): the fold models' own predictions of ``tiles``."""
    from hevisum.explain import tile_model_forward

    DihedralMean = _module_classes()[1]
    forwards = []
    for lm in models:
        fwd = tile_model_forward(lm.method._net)
        forwards.append(DihedralMean(fwd).eval() if tta else fwd)
    errs = [np.abs(_outputs(fwd, tiles, ig["batch_size"], ig["device"]) - method_out[k])
            for k, fwd in enumerate(forwards)]
    res = attribute_pairs(forwards, tiles, pairs, **ig)
    res.forward_check = max(float(np.max(e)) for e in errs)
    res.forward_check_rel = max(float(np.max(e / np.maximum(1.0, np.abs(method_out[k])))) for k, e in enumerate(errs))
    return res


# --------------------------------------------------------------------------------------------- the command


def explain_from_run(run_dir: Path, input_path: str, out: Path, *, targets: str | None = None,
                     spots: str | None = None, n_spots: int = DEFAULT_N_SPOTS, steps: int = 64,
                     baseline: str = DEFAULT_BASELINE, method: str | None = None, rtol: float | None = DEFAULT_RTOL,
                     max_steps: int | None = None, batch_size: int = 16, overlay: str = "abs",
                     reader_kwargs: dict | None = None, device: str = "auto", progress: bool = True,
                     force: bool = False) -> dict:
    """Explain one method of a finished run on spots of ``input_path``; write ``out`` and return explain.json."""
    from hevisum.explain import BASELINES, MAP_MODES
    from hevisum.io import read_inputs
    from hevisum.io.atomic import atomic_dir, atomic_write_text
    from hevisum.methods.base import _json_safe
    from hevisum.outputs import thumbnail
    from hevisum.pipeline import fold_models
    from hevisum.predict import load_run
    from hevisum.training import resolve_device

    if baseline not in BASELINES:
        raise HevisumError(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if overlay not in MAP_MODES:
        raise HevisumError(f"--overlay must be one of {', '.join(MAP_MODES)}, got {overlay!r}")
    if not isinstance(steps, int) or steps < 2:
        raise HevisumError(f"--steps must be an integer of at least 2, got {steps!r}")
    if rtol is not None and not (np.isfinite(rtol) and rtol >= 0):
        raise HevisumError(f"--rtol must be a number >= 0, got {rtol!r}")
    max_steps = int(max_steps if max_steps is not None else 4 * steps)
    if max_steps < steps:
        raise HevisumError(f"--max-steps ({max_steps}) must be at least --steps ({steps})")
    if batch_size < 1:
        raise HevisumError(f"--batch-size must be a positive integer, got {batch_size}")
    if not spots and n_spots < 1:
        raise HevisumError(f"--n-spots must be at least 1, got {n_spots}")
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg, metrics, names = run["cfg"], run["metrics"], list(run["target_names"])
    if targets is not None:
        resolve_targets(targets, names, np.zeros((0, len(names))))  # a bad name stops before any work
    name, why = choose_method(run_dir, metrics, method)
    device = resolve_device(device)
    models = fold_models(run_dir, name)
    kind = explainable_kind(models[0].method)
    if kind is None:
        raise _refuse(run_dir, f"the saved {name!r} models cannot be explained")
    say = (lambda msg: print(f"[hevisum] {msg}", flush=True)) if progress else (lambda msg: None)
    say(f"explaining {name} ({why}; {kind}, {len(models)} fold models)")
    with atomic_dir(Path(out), force=force, protect=[run_dir, Path(input_path)], kind="explain") as tmp:
        result = _explain(tmp, run_dir, input_path, cfg, run, names, name, why, kind, models, targets, spots,
                          n_spots, steps, baseline, rtol if rtol else None, max_steps, batch_size, overlay,
                          reader_kwargs, device, progress, say, read_inputs, thumbnail)
        atomic_write_text(tmp / "explain.json", json.dumps(_json_safe(result), indent=1))
    errs = [e for e in (r["completeness_error"] for r in result["spots"]) if e is not None and np.isfinite(e)]
    say(f"wrote {out}: {len(result['spots'])} spot/target pairs; relative completeness error median "
        f"{np.median(errs) if errs else float('nan'):.2%}, max {max(errs) if errs else float('nan'):.2%}")
    return result


def _explain(tmp: Path, run_dir: Path, input_path: str, cfg, run: dict, names: list[str], name: str, why: str,
             kind: str, models: list, targets_spec, spots_spec, n_spots: int, steps: int, baseline: str,
             rtol, max_steps: int, batch_size: int, overlay: str, reader_kwargs, device: str, progress: bool,
             say, read_inputs, thumbnail) -> dict:
    import pandas as pd

    from hevisum.cv import rank_average
    from hevisum.explain import save_slide_overlay, save_tile_overlays, summarise_attributions
    from hevisum.methods import FitContext
    from hevisum.names import safe_name
    from hevisum.pipeline import feature_store, preprocess_stage
    from hevisum.postprocess import smooth_rows
    from hevisum.preprocess.stain import StainTarget

    # float32 throughout, so the differentiable forwards reproduce the method's outputs
    cfg32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    for lm in models:
        lm.method.cfg = dataclasses.replace(lm.method.cfg, train=dataclasses.replace(lm.method.cfg.train,
                                                                                      precision="fp32"))
    work = tmp / "work"
    slides = read_inputs([input_path], **(reader_kwargs or {}))
    thumbs = {s.slide_id: thumbnail(s.image) for s in slides}
    prep = preprocess_stage(slides, cfg32, work / "prep", [name], progress,
                            stain_target=StainTarget.from_dict(run["stain"]), keep_all_spots=True)
    del slides
    store = feature_store(prep, cfg32, device, progress)
    ctx = FitContext(cfg=cfg32, tiles=prep.tiles, device=device, seed=cfg.seed, progress=progress)
    X = store.for_method(models[0].method)
    n_all, n_t = len(prep.spots), len(names)
    rows = resolve_spots(spots_spec, prep.spots, None, [], n_spots) if spots_spec else None
    slide_col = prep.spots["slide"].astype(str).to_numpy()
    # predictions are per slide (smoothing stays within a slide): only the slides of the chosen spots are needed
    pred_rows = np.arange(n_all) if rows is None else np.flatnonzero(np.isin(slide_col, slide_col[rows]))
    say(f"predicting {len(pred_rows)} spots with {len(models)} fold models")
    fold_preds = []
    for lm in models:
        full = np.full((n_all, n_t), np.nan)
        Xp = None if X is None else X[pred_rows]  # heads predict every row of X, tile networks the rows
        full[pred_rows] = np.asarray(lm.method.predict(Xp, rows=pred_rows, ctx=ctx), dtype=np.float64)
        fold_preds.append(full)
    pred = np.full((n_all, n_t), np.nan)
    pred[pred_rows] = rank_average([smooth_rows(p[pred_rows].astype(np.float32), pred_rows, prep.spots, cfg32)
                                    for p in fold_preds])
    tcols = resolve_targets(targets_spec, names, pred[pred_rows])
    if rows is None:
        rows = resolve_spots(None, prep.spots, pred, tcols, n_spots)
    pairs_rows = [(int(r), t) for t in tcols for r in rows]
    local = {int(r): i for i, r in enumerate(rows)}
    pairs = [(local[r], t) for r, t in pairs_rows]
    say(f"integrated gradients: {len(rows)} spots x {len(tcols)} targets, {steps} steps ({baseline} baseline)")
    ig = dict(steps=steps, baseline=baseline, rtol=rtol, max_steps=max_steps, batch_size=batch_size, device=device)
    notes: list[str] = []
    if kind == TILE_KIND:
        tiles = np.ascontiguousarray(np.asarray(prep.tiles[rows]))
        own = np.stack([p[rows] for p in fold_preds])
        res = explain_tile_models(models, tiles, pairs, own, tta=cfg.train.tta, **ig)
        explained = ("each fold model's output (before smoothing and the rank-average over fold models); the "
                     "attributions are averaged over the fold models")
    else:
        tiles = np.ascontiguousarray(np.asarray(store.tiles["spot"][rows]))
        res, explained, notes = _explain_head(models, store, prep, rows, tiles, pairs, fold_preds, X, cfg32, ig)
    del X, store
    # -------------------------------------------------------------- numbers
    diff = res.output - res.base_output
    rel = _rel(res.attr_sum - diff, diff)
    attrs = res.attributions
    abs_sum = summarise_attributions(attrs, "abs")
    centre = summarise_attributions(attrs, "centre")
    sp = prep.spots.iloc[rows].reset_index(drop=True)
    records = []
    for i, (k, t) in enumerate(pairs):
        slide, sid = str(sp["slide"].iloc[k]), str(sp["spot_id"].iloc[k])
        records.append({
            "slide": slide, "spot_id": sid, "x": float(sp["x"].iloc[k]), "y": float(sp["y"].iloc[k]),
            "target": names[t], "column": f"C{t + 1}", "prediction": float(pred[rows[k], t]),
            "output": float(res.output[i]), "baseline_output": float(res.base_output[i]),
            "output_difference": float(diff[i]), "attribution_sum": float(res.attr_sum[i]),
            "completeness_error": float(rel[i]), "fold_completeness_error_max": float(res.fold_errors[i]),
            "steps": int(res.steps[i]), "attribution_abs": float(abs_sum[i]), "centre_share": float(centre[i]),
            "tile_png": str(Path("tiles") / safe_name(slide) / safe_name(names[t]) / f"{safe_name(sid)}.png"),
        })
    # -------------------------------------------------------------- overlays
    say("writing overlays")
    for t in tcols:
        idx = [i for i, (_, tt) in enumerate(pairs) if tt == t]
        by_slide: dict[str, list[int]] = {}
        for i in idx:
            by_slide.setdefault(records[i]["slide"], []).append(i)
        for slide, ii in by_slide.items():
            ks = [pairs[i][0] for i in ii]
            save_tile_overlays(tmp / "tiles" / safe_name(slide), tiles[ks], attrs[ii],
                               [records[i]["spot_id"] for i in ii], names[t], mode=overlay)
            thumb, scale = thumbs[slide]
            xy = np.array([[records[i]["x"], records[i]["y"]] for i in ii])
            png = tmp / "slides" / f"{safe_name(slide)}__{safe_name(names[t])}.png"
            save_slide_overlay(png, thumb, xy, res.attr_sum[ii], scale=scale, size=60.0,
                               title=f"{slide} · {names[t]} ({name})",
                               label="sum of attributions = f(tile) − f(baseline)")
            for i in ii:
                records[i]["slide_png"] = str(png.relative_to(tmp))
    pd.DataFrame(records).to_csv(tmp / "explain.csv", index=False)
    shutil.rmtree(work, ignore_errors=True)
    errs = rel[np.isfinite(rel)]
    return {
        "run_dir": str(run_dir), "input": str(input_path), "method": name, "chosen_because": why, "kind": kind,
        "selected": run["metrics"]["selected"], "n_fold_models": len(models), "explained_output": explained,
        "notes": notes, "baseline": baseline, "steps": steps, "rtol": rtol, "max_steps": max_steps,
        "integration": "gausslegendre", "precision": "fp32", "overlay": overlay,
        "targets": [{"column": f"C{t + 1}", "name": names[t]} for t in tcols],
        "prediction_is": "the run's prediction of this method: fold models' outputs smoothed over neighbouring "
                         "spots (when smoothing is on), then rank-averaged over fold models (per-spot ranks 0..1)",
        "forward_check_max_abs_error": res.forward_check,
        "forward_check_max_rel_error": res.forward_check_rel,
        "completeness": {"median": float(np.median(errs)) if errs.size else None,
                         "max": float(np.max(errs)) if errs.size else None,
                         "n_pairs": len(records), "n_over_5_percent": int(np.sum(errs > 0.05))},
        "spots": records,
    }


def _explain_head(models: list, store, prep, rows: np.ndarray, tiles: np.ndarray, pairs, fold_preds, X, cfg, ig
                  ) -> tuple[Explained, str, list[str]]:
    """The frozen-encoder chain with the fold models' mean linear map on the encoder block."""
    from hevisum.explain import feature_head_forward, fold_ridge_head, slide_statistics

    EncoderPixels = _module_classes()[0]
    spec = models[0].method.features()[0]
    enc = store.encoder()
    stages = spec.view == "stages" and bool(getattr(enc, "stages_feature_dim", None))
    view = "stages" if stages else "embed"
    base = store.base("encoder", spec.geometry, view)
    n_enc = base.shape[1]
    maps = []
    for lm in models:
        head, pca = _ridge_state(lm.method)
        maps.append(fold_ridge_head(head, **pca))
    W = np.mean([w for w, _ in maps], axis=0)
    b = np.mean([bb for _, bb in maps], axis=0)
    slides = prep.spots["slide"].astype(str).to_numpy()
    embed = EncoderPixels(enc, store.input_px(), stages, cfg.train.tta).eval()
    # the non-encoder blocks' contribution of the mean map, and the method's own (mean) output
    rest = X[rows, n_enc:].astype(np.float64) @ W[:, n_enc:].T if X.shape[1] > n_enc else np.zeros((len(rows), len(b)))
    own = np.mean([p[rows] for p in fold_preds], axis=0)
    scale = np.maximum(1.0, np.max([np.abs(p[rows]) for p in fold_preds], axis=0))  # float32 rounding of each
    parts: list[tuple[list[int], Explained]] = []
    check = check_rel = 0.0
    norm = cfg.models.feature_norm == "slide"
    for slide in dict.fromkeys(slides[rows].tolist()):
        local = np.flatnonzero(slides[rows] == slide)
        mean, std = slide_statistics(base[slides == slide]) if norm else (None, None)
        chain = float64_head(feature_head_forward(embed, mean, std, W, b, columns=slice(0, n_enc)),
                             W[:, :n_enc], b)
        outs = _outputs(chain, tiles[local], ig["batch_size"], ig["device"])
        err = np.abs(outs + rest[local] - own[local])
        check = max(check, float(np.max(err)))
        check_rel = max(check_rel, float(np.max(err / scale[local])))
        on_slide = set(local.tolist())
        sel = [i for i, (k, _) in enumerate(pairs) if k in on_slide]
        if sel:
            remap = {int(k): j for j, k in enumerate(local)}
            parts.append((sel, attribute_pairs([chain], tiles[local], [(remap[pairs[i][0]], pairs[i][1])
                                                                       for i in sel], **ig)))
        del chain
    p = len(pairs)
    res = Explained(np.zeros((p, *tiles.shape[1:]), np.float32), *(np.zeros(p) for _ in range(4)),
                    np.zeros(p, np.int64), check, check_rel)
    for sel, part in parts:
        for f in ("attributions", "output", "base_output", "attr_sum", "fold_errors", "steps"):
            getattr(res, f)[sel] = getattr(part, f)
    notes = []
    if X.shape[1] > n_enc:
        notes.append(f"the method reads {X.shape[1]} feature columns; the chain covers the encoder block's "
                     f"{n_enc}; the other {X.shape[1] - n_enc} (colour statistics, context blocks, coordinates) are "
                     "left out, and the outputs here are the prediction less their contribution")
    explained = ("the encoder block's contribution to the mean of the fold models' outputs: pixels → encoder → "
                 "z-score with the slide's statistics held constant → the fold models' mean ridge map on the "
                 "encoder columns (+ intercept)")
    return res, explained, notes
