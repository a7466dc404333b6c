"""Command-line interface: parse, build the config, call the library. Heavy imports stay inside handlers."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from hevisum.errors import HevisumError

INPUT_HELP = (
    "a competition HDF5 file (images/ + spots/), a 10x Visium Space Ranger folder (with spatial/), "
    "a legacy Spatial Transcriptomics folder (image + spot table + targets table), or an AnnData .h5ad"
)


def _add_reader_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading inputs")
    g.add_argument(
        "--targets",
        default=None,
        help="which targets to read where an input offers several: for her2st folders 'celltypes_subset' "
        "(41 types, default), 'celltypes_major' (8) or 'counts'; for Visium/legacy ST a path to a TSV/CSV "
        "table keyed by barcode or '{x}x{y}'; for Visium 'h5' reads filtered_feature_bc_matrix.h5",
    )
    g.add_argument(
        "--image",
        default="auto",
        choices=["auto", "hires", "lowres", "full"],
        help="Visium: which image to use (auto = hires if present, else lowres); coordinates are scaled to it",
    )
    g.add_argument(
        "--top-genes",
        type=int,
        default=50,
        help="when targets are gene counts: keep this many most variable genes, as log1p(counts/total*1e4) "
        "(an .h5ad's var['highly_variable'] marks, when present, are used instead)",
    )
    g.add_argument(
        "--genes",
        default=None,
        metavar="FILE",
        help="when targets are gene counts: predict exactly these genes (a text file, one name per line) instead "
        "of the most variable ones",
    )
    g.add_argument(
        "--fullres",
        default=None,
        metavar="IMAGE",
        help="Visium: the full-resolution image Space Ranger was run on (TIFF/JPEG); coordinates stay in its frame "
        "(pxl_row/col_in_fullres), microns per pixel from the 55 um spot diameter. A tiled or pyramidal TIFF is "
        "never decoded whole: a working image serves masks and realignment, tiles are read from the file",
    )
    g.add_argument(
        "--test",
        nargs="*",
        default=None,
        metavar="SLIDE",
        help="slide ids to treat as Test (no targets used) where the input does not say",
    )


def _reader_kwargs(args: argparse.Namespace) -> dict:
    return {
        "targets": args.targets,
        "image": getattr(args, "fullres", None) or args.image,
        "top_genes": args.top_genes,
        "test_slides": args.test,
        "genes": _read_gene_list(args.genes) if getattr(args, "genes", None) else None,
    }


def _read_gene_list(path: str) -> list[str]:
    """Gene names, one per line (a CSV/TSV: its first column; a header named gene/genes/symbol is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise HevisumError(f"--genes {path!r} not found; give a text file with one gene name per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HevisumError(f"--genes {path!r}: not a readable text file ({e})") from None
    out = []
    for line in lines:
        name = line.replace("\t", ",").split(",")[0].strip().strip('"')
        if name and name.lower() not in ("gene", "genes", "symbol", "gene_name", "gene_id"):
            out.append(name)
    if not out:
        raise HevisumError(f"--genes {path!r} lists no gene names; give one gene name per line")
    if len(set(out)) != len(out):
        dup = next(g for g in out if out.count(g) > 1)
        raise HevisumError(f"--genes {path!r} lists gene {dup!r} twice")
    return out


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the CPU work: per-slide preprocessing (default: one per CPU, at most 4) and, "
                   "when given, encoder features (N processes, each with its share of the threads); 1 = this "
                   "process only. Results do not depend on it (bfloat16 features: within rounding). Also "
                   "HEVISUM_WORKERS")


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true",
                   help=f"replace {what} even when hevisum did not write it (never an input, the current or the "
                   "home folder); see docs/reliability.md")


def _written_by_hevisum(path: Path) -> bool:
    """An HDF5 / .h5ad file that `hevisum convert` wrote (so replacing it loses nothing of the user's)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("written_by", "")).startswith("hevisum") or "uns/hevisum" in f
    except Exception:  # not HDF5, unreadable: not ours
        return False


def cmd_convert(args: argparse.Namespace) -> int:
    from hevisum import __version__
    from hevisum.io import read_inputs
    from hevisum.io.atomic import atomic_path, check_output_file
    from hevisum.io.competition import write_competition_h5

    out = Path(args.out)
    check_output_file(out, force=args.force, protect=args.inputs, ours=_written_by_hevisum)
    slides = read_inputs(args.inputs, **_reader_kwargs(args))
    if out.suffix.lower() == ".h5ad":
        from hevisum.io.anndata_io import write_h5ad

        write_h5ad(slides, out)  # marked as ours by its uns/hevisum
    else:
        import h5py

        with atomic_path(out) as tmp:
            write_competition_h5(slides, tmp)
            with h5py.File(tmp, "a") as f:
                f.attrs["written_by"] = f"hevisum {__version__}"
    n_train = sum(s.split == "train" for s in slides)
    print(f"wrote {out}: {len(slides)} slide(s), {n_train} Train, {len(slides) - n_train} Test, "
          f"{sum(s.n_spots for s in slides)} spots")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from hevisum.demo import DemoSpec, truth_path_for, write_demo
    from hevisum.io.atomic import check_output_file

    spec = DemoSpec(
        n_train=args.n_train, n_test=args.n_test, n_spots=args.spots, n_targets=args.n_targets, seed=args.seed
    )
    h5 = Path(args.out)
    # an existing file is replaced only when hevisum wrote it (the truth CSV: when the HDF5 beside it is ours)
    check_output_file(h5, force=args.force, ours=_written_by_hevisum)
    if not h5.is_dir():
        check_output_file(truth_path_for(h5), force=args.force, ours=lambda _: _written_by_hevisum(h5))
    write_demo(h5, spec)
    print(f"wrote {args.out}: {spec.n_train} Train + {spec.n_test} Test slides, ~{spec.n_spots} spots each, "
          f"{spec.n_targets} targets (seed {spec.seed})")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    import dataclasses
    import inspect

    from hevisum.config import load_run_config
    from hevisum.io import read_inputs
    from hevisum.io.atomic import check_output
    from hevisum.preprocess.pipeline import preprocess

    # Checked before any work (preprocess() checks again when it starts writing). A preprocess() that takes
    # force/protect marks its folders "prep"; an older one marked them "run".
    protect = [args.input, args.config]
    takes = inspect.signature(preprocess).parameters
    safety = {k: v for k, v in (("force", args.force), ("protect", protect)) if k in takes}
    check_output(args.out, force=args.force, protect=protect, kind="prep" if "force" in takes else "run")

    # The same config file serves `hevisum run` and `hevisum preprocess`; only its preprocessing sections apply.
    cfg = load_run_config(args.config).preprocess_config()
    if args.tile_size:
        cfg = dataclasses.replace(cfg, tiles=dataclasses.replace(cfg.tiles, size=args.tile_size))
        cfg.tiles.check()
    slides = read_inputs([args.input], **_reader_kwargs(args))
    prepared = preprocess(slides, cfg, Path(args.out), progress=not args.quiet, **safety)
    print(f"wrote {args.out}: {prepared.summary()}")
    return 0


def _run_overrides(args: argparse.Namespace) -> dict:
    """Config keys set by flags (they override the config file)."""
    over: dict = {}
    if args.encoder:
        over.setdefault("encoder", {})["name"] = args.encoder
    if args.encoder_weights:
        over.setdefault("encoder", {})["weights"] = str(Path(args.encoder_weights).resolve())
    if args.methods:
        over.setdefault("models", {})["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.context is not None:
        over.setdefault("features", {})["context"] = [c.strip() for c in args.context.split(",") if c.strip()]
    if args.tiles:
        over.setdefault("features", {})["tiles"] = args.tiles
    return over


def cmd_run(args: argparse.Namespace) -> int:
    from hevisum import distributed

    distributed.set_fold_mode(getattr(args, "dist_folds", None))
    if getattr(args, "nproc", 1) > 1 and distributed.env_world() <= 1:  # start torchrun, which runs us N times
        return distributed.launch(args.nproc, distributed.strip_nproc(getattr(args, "argv", None) or sys.argv[1:]))
    if distributed.env_world() > 1:  # one rank of torchrun: failures agreed, one error line from rank 0
        return distributed.guard(lambda: _cmd_run(args))
    return _cmd_run(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from hevisum import distributed
    from hevisum.io.atomic import check_output
    from hevisum.pipeline import run_pipeline

    distributed.init_from_env(args.device)
    if distributed.is_main():  # the other ranks wait for rank 0's lock on OUT at a barrier
        check_output(args.out, force=args.force, protect=[*args.inputs, args.config, args.truth], kind="run")
    run_pipeline(
        overrides=_run_overrides(args),
        inputs=list(args.inputs) or None,
        out=Path(args.out),
        config_path=args.config,
        profile=args.profile,
        truth=args.truth,
        seed=args.seed,
        reader_kwargs=_reader_kwargs(args),
        device=args.device,
        progress=not args.quiet,
        force=args.force,
        resume=args.resume,
    )
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from hevisum.methods import baseline_names, get_method, method_names

    for name in method_names(include_stackers=True):
        cls = get_method(name)
        kind = "baseline" if name in baseline_names() else ("stacker" if cls.stacker else
                                                            ("tiles" if cls.uses_tiles else "features"))
        print(f"{name:18s} {kind:9s} {cls.summary}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hevisum.io.atomic import check_output
    from hevisum.predict import predict_from_run
    from hevisum.wsi_predict import is_slide_image, predict_slide

    check_output(args.out, force=args.force, protect=[args.run_dir, args.input], kind="predict")
    if is_slide_image(args.input):
        predict_slide(Path(args.run_dir), args.input, Path(args.out), grid_um=args.grid_um, um_per_px=args.um_per_px,
                      hexagonal=not args.square, min_tissue=args.min_tissue, plot_targets=args.plot_targets,
                      device=args.device, progress=not args.quiet, force=args.force)
        return 0
    given = [f for f, v in (("--grid-um", args.grid_um), ("--um-per-px", args.um_per_px), ("--square", args.square),
                            ("--plot-targets", args.plot_targets), ("--min-tissue", args.min_tissue != 0.5)) if v]
    if given:
        raise HevisumError(f"{', '.join(given)} apply to a slide image without spots (SVS, NDPI, MRXS, TIFF, PNG, "
                           f"JPEG...); {args.input!r} is read with its own spots")
    predict_from_run(Path(args.run_dir), args.input, Path(args.out), reader_kwargs=_reader_kwargs(args),
                     progress=not args.quiet, device=args.device, force=args.force)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from hevisum.explain_run import explain_from_run
    from hevisum.io.atomic import check_output

    check_output(args.out, force=args.force, protect=[args.run_dir, args.input], kind="explain")
    explain_from_run(Path(args.run_dir), args.input, Path(args.out), targets=args.targets, spots=args.spots,
                     n_spots=args.n_spots, steps=args.steps, baseline=args.baseline, method=args.method,
                     rtol=args.rtol, max_steps=args.max_steps, batch_size=args.batch_size, overlay=args.overlay,
                     reader_kwargs={"image": args.image}, device=args.device, progress=not args.quiet,
                     force=args.force)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from hevisum.metrics import evaluate_files

    result = evaluate_files(args.pred, args.truth)
    print(json.dumps(result, indent=2 if args.pretty else None))
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    import json

    from hevisum.encoders.registry import format_presets_table, list_presets

    if args.json:
        print(json.dumps([preset.as_dict() for preset in list_presets()], indent=2))
    else:
        print(format_presets_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hevisum",
        description="Predict the molecular profile (cell-type abundances or gene expression) of every "
        "spatial-transcriptomics spot from an H&E image.",
        epilog="Start with 'hevisum run --out runs/demo' (generated demo data), then point it at your data.",
    )
    from hevisum import __version__

    p.add_argument("--version", action="version", version=f"hevisum {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="turn any supported input into the competition HDF5 layout (or .h5ad)",
                       description="Read one or several inputs and write them as one competition-layout HDF5 "
                       "(images/{Train,Test}/<slide>, spots/{Train,Test}/<slide>), or as .h5ad when OUT ends so. "
                       f"Inputs: {INPUT_HELP}.")
    c.add_argument("inputs", nargs="+", metavar="INPUT", help="input file(s) or folder(s)")
    c.add_argument("out", metavar="OUT", help="output .h5 (competition layout) or .h5ad")
    _add_force(c, "an existing OUT file")
    _add_reader_options(c)
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo-data", help="write a synthetic dataset in the competition layout",
                       description="Write a deterministic synthetic H&E-like dataset with a learnable image->target "
                       "signal, tissue on a background, and spot grids shifted by known amounts on some slides "
                       "(stored in the file as the 'applied_shift' attribute of each spots dataset).")
    d.add_argument("out", metavar="OUT.h5")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--n-train", type=int, default=4, help="training slides (default 4)")
    d.add_argument("--n-test", type=int, default=1, help="test slides (default 1)")
    d.add_argument("--spots", type=int, default=300, help="approximate spots per slide (default 300)")
    d.add_argument("--n-targets", type=int, default=35, help="targets per spot (default 35)")
    _add_force(d, "an existing OUT.h5 or its truth CSV")
    d.set_defaults(func=cmd_demo_data)

    pp = sub.add_parser("preprocess", help="stain-normalise, mask, realign, filter, rank and tile",
                        description="Run the preprocessing pipeline and write a work folder: the tile cache "
                        "(tiles.npy, memory-mappable uint8), spots.csv, targets, qc.json, QC PNGs and the resolved "
                        "config.toml. Each step is switchable in the config file (TOML).")
    pp.add_argument("input", metavar="INPUT", help=INPUT_HELP)
    pp.add_argument("--out", required=True, metavar="WORKDIR", help="work folder to write")
    pp.add_argument("--config", default=None, metavar="FILE", help="TOML config (see docs/config.md)")
    pp.add_argument("--tile-size", type=int, default=None, help="model input side in px (default 78)")
    pp.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_workers(pp)
    _add_force(pp, "an existing WORKDIR")
    _add_reader_options(pp)
    pp.set_defaults(func=cmd_preprocess)

    r = sub.add_parser("run", help="the main job: preprocess, cross-validate, train, ensemble, predict, report",
                       description="Preprocess, leave-one-slide-out cross-validation, train, ensemble and stack, "
                       "predict the Test slides, evaluate and write report.html. With no INPUT it runs on "
                       "generated demo data.")
    r.add_argument("inputs", nargs="*", metavar="INPUT",
                   help=INPUT_HELP + "; several inputs, or a manifest CSV (columns path, slide, split, group and "
                   "optionally fullres, targets, um_per_px: one row per slide; slides of one group, a patient, are "
                   "held out together) (default: generated demo data)"),
    r.add_argument("--out", required=True, metavar="DIR", help="run folder to write")
    r.add_argument("--config", default=None, metavar="FILE", help="TOML config (see docs/config.md)")
    r.add_argument("--profile", default=None, choices=["fast", "reference"],
                   help="fast: frozen pretrained encoder + ridge/MLP heads (default on CPU); "
                   "reference: train the reference CNN")
    r.add_argument("--truth", default=None, metavar="T.csv",
                   help="truth for the Test slides (slide, ID, C1..Cn) to add the test evaluation")
    r.add_argument("--seed", type=int, default=None, help="random seed (default from config, 0)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _add_force(r, "an existing DIR")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from DIR.partial, reusing its finished work")
    g = r.add_argument_group("models and encoders")
    g.add_argument("--methods", default=None, metavar="M1,M2",
                   help="methods to cross-validate beside the baselines (default encoder-ridge,encoder-mlp; "
                   "'hevisum methods' lists them)")
    g.add_argument("--encoder", default=None, metavar="NAME",
                   help="frozen encoder preset for the encoder-* methods (default effnet-lite0, built in; "
                   "'hevisum encoders' lists the presets)")
    g.add_argument("--encoder-weights", default=None, metavar="PATH",
                   help="the encoder's weight file (.safetensors, or a torch state dict), downloaded by you; "
                   "required for every preset but effnet-lite0. Nothing is ever downloaded")
    g.add_argument("--tiles", default=None, choices=["spot", "tissue"],
                   help="what the encoder sees: spot (tiles.scale x pitch, default) or tissue (its own field of "
                   "view at its own microns per pixel, when the input knows microns per pixel)")
    g.add_argument("--context", default=None, metavar="C1,C2",
                   help="spatial context for the encoder heads: ring1, ring2 (neighbour means), slide (slide "
                   "mean), wide (a wider field of view); empty string for none")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_workers(r)
    _add_reader_options(r)
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run N processes on this machine (started with torchrun; see docs/distributed.md)")
    r.add_argument("--dist-folds", default=None, choices=["auto", "spread", "ddp"],
                   help="with several processes: spread (each process fits whole CV folds alone, the results of "
                   "one process), ddp (every process in every fold; DistributedDataParallel for tile models) or "
                   "auto (default: spread when there are at least as many folds as processes)")
    r.set_defaults(func=cmd_run)

    pr = sub.add_parser("predict", help="predict new slides with a finished run folder",
                        description="Load the models, stain target and config saved in RUN_DIR and predict every "
                        "spot of INPUT; writes predictions.csv, submission_<slide>.csv and predictions.h5ad. INPUT "
                        "may also be a slide image without spots (SVS, NDPI, MRXS, TIFF pyramid, OME-TIFF, PNG, "
                        "JPEG): a virtual spot grid is laid over its tissue and predicted, with heat maps of the "
                        "predictions (see docs/wsi.md).")
    pr.add_argument("run_dir", metavar="RUN_DIR")
    pr.add_argument("input", metavar="INPUT", help=INPUT_HELP + ", or a slide image without spots")
    pr.add_argument("--out", required=True, metavar="DIR")
    pr.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_workers(pr)
    _add_force(pr, "an existing DIR")
    w = pr.add_argument_group("slide images without spots")
    w.add_argument("--grid-um", type=float, default=None, metavar="PITCH",
                   help="distance between the virtual grid's spots in microns (default: the training slides' spot "
                   "pitch; required when the run does not know it in microns)")
    w.add_argument("--um-per-px", type=float, default=None, metavar="X",
                   help="microns per full-resolution pixel of the slide, when its file does not say (or is wrong)")
    w.add_argument("--square", action="store_true", help="a square spot lattice instead of the hexagonal one")
    w.add_argument("--min-tissue", type=float, default=0.5, metavar="F",
                   help="keep a grid spot when at least this fraction of it is tissue (default 0.5)")
    w.add_argument("--plot-targets", default=None, metavar="C3,C7",
                   help="targets to draw as heat maps, by name or C<i> (default: the 4 most variable predictions)")
    _add_reader_options(pr)
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("explain", help="integrated-gradients attributions of a run's predictions to the tile pixels",
                        description="Explain one method of a finished run on spots of INPUT (preprocessed as "
                        "'hevisum predict' does): integrated gradients of the chosen targets w.r.t. the pixels of "
                        "each spot's tile, written as overlays on the tile (tiles/<slide>/<target>/<spot>.png) and "
                        "on the slide thumbnail (slides/<slide>__<target>.png), with explain.json and explain.csv "
                        "(prediction, f(tile) - f(baseline), sum of attributions and the relative completeness "
                        "error per spot and target). See docs/explain.md.")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("input", metavar="INPUT", help=INPUT_HELP)
    ex.add_argument("--out", required=True, metavar="DIR")
    ex.add_argument("--targets", default=None, metavar="C3,C7",
                    help="targets to explain, by name or C<i> (default: the 2 most variable predictions)")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--spots", default=None, metavar="ID1,ID2",
                       help="spot ids to explain (ID on any slide, or SLIDE:ID)")
    which.add_argument("--n-spots", type=int, default=4, metavar="N",
                       help="without --spots: N spots per slide with the highest and lowest predictions of the "
                       "targets (default 4)")
    ex.add_argument("--method", default=None, metavar="NAME",
                    help="a saved method of the run to explain (default: the selected one; for the stacker, the "
                    "method it weighs most). Tile networks and ridge heads on encoder features can be explained")
    ex.add_argument("--steps", type=int, default=64, help="integration steps (Gauss-Legendre; default 64)")
    ex.add_argument("--baseline", default="white", choices=["black", "white", "blur"],
                    help="the reference image the attributions are measured from: white (empty glass, default), "
                    "black, or the tile blurred")
    ex.add_argument("--rtol", type=float, default=0.05,
                    help="attribute again with twice the steps where the relative completeness error exceeds this "
                    "(default 0.05; 0 = never)")
    ex.add_argument("--max-steps", type=int, default=None, metavar="N",
                    help="most steps --rtol may raise to (default 4 x --steps)")
    ex.add_argument("--overlay", default="abs", choices=["abs", "signed", "positive", "negative"],
                    help="tile heat map: magnitude, both signs, or one sign of the attributions (default abs)")
    ex.add_argument("--batch-size", type=int, default=16, help="images per forward/backward pass (default 16)")
    ex.add_argument("--image", default="auto", choices=["auto", "hires", "lowres", "full"],
                    help="Visium: which image to use (auto = hires if present, else lowres)")
    ex.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ex.add_argument("--quiet", action="store_true", help="no progress messages")
    _add_force(ex, "an existing DIR")
    ex.set_defaults(func=cmd_explain)

    mt = sub.add_parser("methods", help="list the registered methods",
                        description="Every method 'hevisum run' can cross-validate, with its kind: baseline "
                        "(always reported), features (a head on cached per-tile features), tiles (a network "
                        "trained on the tiles), stacker.")
    mt.set_defaults(func=cmd_methods)

    en = sub.add_parser("encoders", help="list the image encoder presets (architecture, input, licence, weights)",
                        description="Every encoder preset: architecture, parameters, input size and resolution, "
                        "normalisation, pooling and feature length, licence and the weight file to download from "
                        "its publisher (hevisum never downloads weights; pass the file with --encoder-weights). "
                        "See docs/encoders.md.")
    en.add_argument("--json", action="store_true", help="print the presets as JSON")
    en.set_defaults(func=cmd_encoders)

    e = sub.add_parser("evaluate", help="score predictions against truth (per-spot Spearman etc.)",
                       description="Both CSVs have columns slide, ID, C1..Cn (or named targets). Prints JSON with "
                       "per-spot Spearman (the competition metric), per-target Spearman and Pearson, and MSE, per "
                       "slide and overall.")
    e.add_argument("--pred", required=True, metavar="P.csv")
    e.add_argument("--truth", required=True, metavar="T.csv")
    e.add_argument("--pretty", action="store_true", help="indent the JSON")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    def command() -> int:
        from hevisum import workers

        workers.set_workers(getattr(args, "workers", None))
        return args.func(args)

    return run_command(command)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) received: handled like Ctrl-C, so clean-up code runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_interrupts():
    """Within: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (signals ignored by the caller, e.g. SIGHUP
    under nohup, stay ignored). Only in the main thread, where Python delivers signals."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_command(func) -> int:
    """Run one command: its exit code; a HevisumError is one line and 2; a signal n is one line and 128+n."""
    with signals_as_interrupts():
        try:
            return int(func() or 0)
        except HevisumError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            signum = int(getattr(e, "signum", signal.SIGINT))
            notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))
            print(f"interrupted ({signal.Signals(signum).name}){notes}", file=sys.stderr)
            return 128 + signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
