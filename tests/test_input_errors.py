"""Bad input gives one clear line: each reported case, with the words the message must hold.

The broad, generated search is ``tests/test_fuzz.py``; these are the cases users met, checked message by message,
and the rules for names read from files (file names, plot text).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hevisum.cli import main
from hevisum.config import PreprocessConfig, RunConfig, load_run_config
from hevisum.errors import HevisumError
from hevisum.names import plot_text, safe_name


@pytest.fixture(scope="module")
def demo_slides():
    from hevisum.demo import DemoSpec, make_demo_slides

    return make_demo_slides(DemoSpec(seed=0, n_train=2, n_test=1, n_spots=20, n_targets=3))


@pytest.fixture
def comp(demo_slides, tmp_path) -> Path:
    from hevisum.io.competition import write_competition_h5

    p = tmp_path / "in.h5"
    write_competition_h5(demo_slides, p)
    return p


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def one_error(argv, capsys, *words: str) -> str:
    """Run; expect exit 2 and exactly one 'error:' line holding every word (case-insensitive)."""
    rc, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------ competition HDF5
def test_truncated_hdf5(comp, tmp_path, capsys):
    data = comp.read_bytes()
    comp.write_bytes(data[: len(data) // 2])
    one_error(["convert", comp, tmp_path / "o.h5"], capsys, str(comp), "truncated")
    comp.write_bytes(b"")
    one_error(["convert", comp, tmp_path / "o.h5"], capsys, str(comp), "not an HDF5 file", "0 bytes")


def test_slide_nested_as_a_group_and_image_that_is_a_group(comp, tmp_path, capsys):
    with h5py.File(comp, "a") as f:
        f.move("images/Train/S_1", "images/Train/tmp")
        f.create_group("images/Train/S_1")
        f.move("images/Train/tmp", "images/Train/S_1/b")
    one_error(["convert", comp, tmp_path / "o.h5"], capsys, "images/Train/S_1 is a group", "['b']",
              "slide ids cannot contain '/'")


def test_declared_image_shape_is_checked_before_reading(comp, tmp_path, capsys):
    with h5py.File(comp, "a") as f:
        del f["images/Train/S_1"]
        f.create_dataset("images/Train/S_1", shape=(200_000, 200_000, 3), dtype="u1", chunks=(1, 1, 3))
    line = one_error(["convert", comp, tmp_path / "o.h5"], capsys, "images/Train/S_1", "200000x200000",
                     "1200 Mpx limit")
    assert "GiB" in line


def test_string_coordinate_field(comp, tmp_path, capsys):
    with h5py.File(comp, "a") as f:
        rec = f["spots/Train/S_2"][()]
        new = np.zeros(len(rec), dtype=[(n, "S8" if n == "y" else rec.dtype[n]) for n in rec.dtype.names])
        for n in rec.dtype.names:
            new[n] = rec[n].astype("S8") if n == "y" else rec[n]
        del f["spots/Train/S_2"]
        f["spots/Train/S_2"] = new
    one_error(["convert", comp, tmp_path / "o.h5"], capsys, "spots/Train/S_2", "field 'y'", "expected numbers")


def test_training_slide_with_all_zero_targets_is_refused_by_preprocess(comp, tmp_path, capsys):
    with h5py.File(comp, "a") as f:
        rec = f["spots/Train/S_1"][()]
        for c in ("C1", "C2", "C3"):
            rec[c] = 0.0
        f["spots/Train/S_1"][...] = rec
    one_error(["preprocess", comp, "--out", tmp_path / "w", "--quiet"], capsys, "'S_1'", "every target of every "
              "spot is 0", "--test")
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------ Visium and legacy ST
def _visium(folder: Path, s) -> Path:
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    Image.fromarray(s.image).save(spatial / "tissue_hires_image.png")
    bcs = [f"B{i}-1" for i in range(s.n_spots)]
    pd.DataFrame({"barcode": bcs, "in_tissue": 1, "array_row": 0, "array_col": 0, "pxl_row_in_fullres": s.xy[:, 1],
                  "pxl_col_in_fullres": s.xy[:, 0]}).to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 1.0}))
    return folder


def test_duplicated_visium_barcode_is_named(demo_slides, tmp_path, capsys):
    root = _visium(tmp_path / "sample", demo_slides[0])
    pos = root / "spatial" / "tissue_positions.csv"
    df = pd.read_csv(pos)
    df.loc[5, "barcode"] = df.loc[2, "barcode"]  # one spot would silently replace the other
    df.to_csv(pos, index=False)
    one_error(["convert", root, tmp_path / "o.h5"], capsys, str(pos), "barcode 'B2-1' appears 2 times",
              "rows 3 and 6")


def test_legacy_spots_all_at_one_pixel(demo_slides, tmp_path, capsys):
    from hevisum.io.legacy_st import estimate_um_per_px

    root = tmp_path / "mob"
    root.mkdir()
    s = demo_slides[0]
    Image.fromarray(s.image).save(root / "M1.png")
    n = s.n_spots
    pd.DataFrame({"x": np.arange(n) % 5, "y": np.arange(n) // 5, "pixel_x": 40.0, "pixel_y": 50.0,
                  "selected": 1}).to_csv(root / "alignment_table_M1.tsv", sep="\t", index=False)
    keys = [f"{x}x{y}" for x, y in zip(np.arange(n) % 5, np.arange(n) // 5)]
    pd.DataFrame(s.targets, index=keys, columns=["A", "B", "C"]).to_csv(root / "M1.tsv", sep="\t")
    one_error(["convert", root, tmp_path / "o.h5"], capsys, "'M1'", f"all {n} spots lie at the same pixel")
    a = np.column_stack([np.arange(n) % 5, np.arange(n) // 5])
    assert estimate_um_per_px(a, np.full((n, 2), 7.0)) is None  # no division by zero


# ------------------------------------------------------------------------------------ config
def _float_keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        v = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(v):
            out += _float_keys(type(v), f"{prefix}{f.name}.")
        elif isinstance(v, float):
            out.append(f"{prefix}{f.name}")
    return out


def _toml(key: str, value: str) -> str:
    section, _, name = key.rpartition(".")
    return f"[{section}]\n{name} = {value}\n" if section else f"{name} = {value}\n"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_config_float_must_be_finite(tmp_path, value):
    keys = _float_keys(RunConfig)
    assert "tissue.blur_sigma" in keys and "smoothing.sigma_pitches" in keys
    for key in keys:
        p = tmp_path / "c.toml"
        p.write_text(_toml(key, value))
        with pytest.raises(HevisumError, match=rf"^{key} must be a finite number"):
            load_run_config(p)


def test_preprocessing_floats_have_an_upper_bound(tmp_path):
    keys = [k for k in _float_keys(RunConfig) if k.split(".")[0] in
            {f.name for f in dataclasses.fields(PreprocessConfig)} | {"smoothing", "train"}]
    for key in keys:
        p = tmp_path / "c.toml"
        p.write_text(_toml(key, "1e300"))
        with pytest.raises(HevisumError, match=rf"^{key} must be (a number )?in "):
            load_run_config(p)


def test_nan_blur_and_inf_sigma_stop_before_any_work(comp, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tissue]\nblur_sigma = nan\n")
    one_error(["preprocess", comp, "--out", tmp_path / "w", "--config", cfg, "--quiet"], capsys,
              "tissue.blur_sigma must be a finite number, got nan")
    cfg.write_text("[smoothing]\nsigma_pitches = inf\n")
    one_error(["preprocess", comp, "--out", tmp_path / "w", "--config", cfg, "--quiet"], capsys,
              "smoothing.sigma_pitches", "inf")
    assert not (tmp_path / "w").exists()


def test_out_dot_is_refused(comp, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error(["preprocess", comp, "--out", ".", "--quiet"], capsys, "'.'", "current folder")


# ------------------------------------------------------------------------------------ names are data
HOSTILE = ["$x^$", "a\\b", "a\\$x$", "$$", "\\", "x\\$", "<script>", "a\nb", "nul\x01", "é漢字", "$\\frac{a}{$"]


@pytest.mark.filterwarnings("ignore:Glyph")
@pytest.mark.parametrize("name", HOSTILE)
def test_plot_text_is_drawn_as_written_never_as_math(name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    shown, math = Text()._preprocess_math(plot_text(name))
    assert math is False
    printable = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)
    assert shown == printable
    fig = Figure()
    FigureCanvasAgg(fig)
    fig.subplots().set_title(plot_text(name))
    fig.canvas.draw()  # a name matplotlib parsed as math would raise here ($x^$)


@pytest.mark.parametrize("name", HOSTILE + ["..", ".", "../../x", "/etc/passwd", "n" * 300, "", "CON", "a/b"])
def test_safe_name_is_one_plain_component(name):
    s = safe_name(name)
    assert s and s not in (".", "..") and "/" not in s and "\\" not in s and len(s) <= 80
    assert all(c.isascii() and (c.isalnum() or c in "._+-") for c in s)
    assert safe_name(name + "x") != s  # different names never share a file


def test_hostile_slide_ids_reach_qc_plots_and_file_names_safely(demo_slides, tmp_path):
    from hevisum.config import StainConfig, TilesConfig
    from hevisum.preprocess.pipeline import preprocess

    names = ["$x^$", "../../evil", "a\nb"]
    slides = [dataclasses.replace(s, slide_id=n) for s, n in zip(demo_slides, names)]
    cfg = dataclasses.replace(PreprocessConfig(), stain=StainConfig(method="none"), tiles=TilesConfig(size=9))
    prep = preprocess(slides, cfg, tmp_path / "w", progress=False)
    pngs = sorted(p.name for p in (tmp_path / "w" / "qc").iterdir())
    assert pngs == sorted([f"{safe_name(n)}_realign.png" for n in names] + ["overview.png"])
    assert set(prep.qc) == set(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # nothing beside the work folder
