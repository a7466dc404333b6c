"""Hostile inputs through the CLI: every case exits 0, or exits 2 with one ``error:`` line and no traceback.

Small valid inputs of every format (competition HDF5, Space Ranger folder, legacy ST folder, .h5ad) and of the
config are mutated: truncated and damaged files, dropped groups, datasets and columns, wrong dtypes, NaN and
infinities, duplicated ids, hostile names (``..``, ``\\``, ``$x^$``, ``<script>``, unicode, control characters,
300 characters) and huge declared shapes. Each case runs ``hevisum convert`` (and ``hevisum preprocess`` where
marked) in-process and checks, besides the exit code and stderr, that nothing is written outside the output
(the case's whole folder tree is listed before and after) and that an existing output survives a failure
byte for byte. The cases are generated from a fixed seed: the same ids and the same files on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import traceback
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd
import pytest
from numpy.lib import recfunctions as rfn
from PIL import Image

from hevisum.cli import main

SEED = 20240611
HOSTILE_NAMES = {
    "dotdot": "..",
    "backslash": "a\\b",
    "math": "$x^$",
    "math2": "$\\frac{a}{$",
    "html": "<script>alert(1)</script>",
    "unicode": "é漢字-ß\u200b",
    "long": "n" * 300,
    "newline": "a\nb",
    "control": "nul\x01x",
    "space": " lead space",
    "dash": "-x",
    "percent": "%s%n{0}",
}
# names a file system accepts (no '/', no NUL) and that stay under its 255-byte limit
FS_NAMES = {"math": "$x^$", "html": "<script>", "unicode": "é漢字-ß", "backslash": "a\\b", "long": "n" * 200,
            "space": " lead space", "glob": "a[1]*?", "dash": "-x"}
FAST_CONFIG = "[stain]\nmethod = 'none'\n[tiles]\nsize = 9\n"


# ------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    fmt: str  # competition | visium | legacy | h5ad | config
    mutate: Callable[[Path], Path | None] | None  # edits the copied base in place; may return another input path
    preprocess: bool = False  # also run `hevisum preprocess` when convert succeeded
    config: str | None = None  # TOML text for preprocess (config cases)
    convert: bool = True


CASES: list[Case] = []


def case(fmt: str, name: str, mutate=None, **kw) -> None:
    CASES.append(Case(id=f"{fmt}-{name}", fmt=fmt, mutate=mutate, **kw))


def _rng(family: str) -> random.Random:
    """One stream per family: adding a family leaves the other cases as they were."""
    return random.Random(f"{SEED}-{family}")


# ---- shared mutations of any single file
def truncate_at(rel: str, frac: float):
    def m(root: Path):
        p = root / rel
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * frac)])
    return m


def corrupt(rel: str, seed: int, n: int, start_frac: float = 0.3):
    def m(root: Path):
        p = root / rel
        data = bytearray(p.read_bytes())
        r = random.Random(seed)
        for _ in range(n):
            i = r.randrange(int(len(data) * start_frac), len(data))
            data[i] = r.randrange(256)
        p.write_bytes(bytes(data))
    return m


def write_bytes(rel: str, data: bytes):
    def m(root: Path):
        (root / rel).write_bytes(data)
    return m


def delete(rel: str):
    def m(root: Path):
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return m


def rename(rel: str, new: str):
    def m(root: Path):
        (root / rel).rename((root / rel).with_name(new))
    return m


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels but holds almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


# ---- competition HDF5: comp.h5 with images/{Train,Test}, spots/Train/S_1, S_2 (x, y, C1..C3), spots/Test/S_3
COMP = "comp.h5"


def h5edit(fn):
    def m(root: Path):
        with h5py.File(root / COMP, "a") as f:
            fn(f)
    return m


def set_fields(ds_name: str, fn):
    """Rebuild the structured dataset ``ds_name`` with ``fn(rec) -> rec``."""
    def edit(f):
        rec = f[ds_name][()]
        attrs = dict(f[ds_name].attrs)
        new = fn(rec)
        del f[ds_name]
        ds = f.create_dataset(ds_name, data=new)
        for k, v in attrs.items():
            ds.attrs[k] = v
    return h5edit(edit)


def retype(field_name: str, dtype, values=None):
    def fn(rec):
        dt = [(n, dtype if n == field_name else rec.dtype[n]) for n in rec.dtype.names]
        out = np.zeros(len(rec), dtype=dt)
        for n in rec.dtype.names:
            if n == field_name:
                out[n] = values(rec[n]) if values is not None else rec[n].astype(dtype)
            else:
                out[n] = rec[n]
        return out
    return fn


def set_values(field_name: str, values):
    def fn(rec):
        rec = rec.copy()
        if field_name in ("x", "y") and rec.dtype[field_name].kind in "iu":
            rec = retype(field_name, "<f8")(rec)
        rec[field_name] = values(rec[field_name])
        return rec
    return fn


def replace_dataset(name: str, **kw):
    def edit(f):
        del f[name]
        f.create_dataset(name, **kw)
    return h5edit(edit)


def move(src: str, dst: str):
    def edit(f):
        f.move(src, dst)
    return h5edit(edit)


def rename_slide(old: str, new: str, split: str = "Train"):
    def edit(f):
        f.move(f"images/{split}/{old}", f"images/{split}/{new}")
        f.move(f"spots/{split}/{old}", f"spots/{split}/{new}")
    return h5edit(edit)


def set_attr(name: str, value, obj: str = "/"):
    def edit(f):
        f[obj].attrs[name] = value
    return h5edit(edit)


def _competition_cases() -> None:
    r = _rng("comp-truncate")
    for i, frac in enumerate([0.0, 0.001] + [r.uniform(0.05, 0.98) for _ in range(8)]):
        case("competition", f"truncate{i}-{frac:.3f}", truncate_at(COMP, frac))
    r = _rng("comp-corrupt")
    for i in range(8):
        case("competition", f"corrupt{i}", corrupt(COMP, r.randrange(10**9), n=r.choice([1, 4, 32])))
    for name in ["images", "spots", "images/Train", "images/Test", "spots/Train", "spots/Test",
                 "images/Train/S_1", "spots/Train/S_2", "spots/Test/S_3"]:
        case("competition", f"drop-{name.replace('/', '.')}", h5edit(lambda f, n=name: f.__delitem__(n)))
    case("competition", "drop-attr-target_names", h5edit(lambda f: f.attrs.__delitem__("target_names")))
    # an object of the wrong kind where a slide or a split belongs
    case("competition", "images.Train-is-dataset", replace_dataset("images/Train", data=np.zeros(3)))
    case("competition", "spots-is-dataset", replace_dataset("spots", data=np.zeros(3)))
    case("competition", "image-is-group", h5edit(lambda f: (f.__delitem__("images/Train/S_1"),
                                                            f.create_group("images/Train/S_1"))))
    case("competition", "spots-is-group", h5edit(lambda f: (f.__delitem__("spots/Train/S_1"),
                                                            f.create_group("spots/Train/S_1"))))
    case("competition", "slide-nested-a.b", h5edit(lambda f: (f.move("images/Train/S_1", "images/Train/tmp"),
                                                              f.create_group("images/Train/S_1"),
                                                              f.move("images/Train/tmp", "images/Train/S_1/b"),
                                                              f.move("spots/Train/S_1", "spots/Train/tmp"),
                                                              f.create_group("spots/Train/S_1"),
                                                              f.move("spots/Train/tmp", "spots/Train/S_1/b"))))
    case("competition", "dangling-soft-link", h5edit(lambda f: (f.__delitem__("images/Train/S_1"),
                                                                f.__setitem__("images/Train/S_1",
                                                                              h5py.SoftLink("/nowhere")))))
    case("competition", "external-link", h5edit(lambda f: (f.__delitem__("images/Train/S_1"),
                                                           f.__setitem__("images/Train/S_1",
                                                                         h5py.ExternalLink("../../x.h5", "/a")))))
    # spot fields of a Train slide
    tr = "spots/Train/S_1"
    field_cases = {
        "drop-x": lambda rec: rfn.drop_fields(rec, "x", usemask=False),
        "drop-y": lambda rec: rfn.drop_fields(rec, "y", usemask=False),
        "drop-C2": lambda rec: rfn.drop_fields(rec, "C2", usemask=False),
        "drop-targets": lambda rec: rfn.drop_fields(rec, ["C1", "C2", "C3"], usemask=False),
        "x-numeric-strings": retype("x", "S8"),
        "x-garbage-strings": retype("x", "S8", lambda v: np.full(len(v), b"abc")),
        "y-bool": retype("y", "?"),
        "x-complex": retype("x", "<c16"),
        "C1-strings": retype("C1", "S8"),
        "C2-int8": retype("C2", "i1", lambda v: (v * 100).astype("i1")),
        "x-nan": set_values("x", lambda v: np.where(np.arange(len(v)) == 3, np.nan, v)),
        "y-inf": set_values("y", lambda v: np.where(np.arange(len(v)) == 0, np.inf, v)),
        "x-negative": set_values("x", lambda v: v - 10**6),
        "x-huge": set_values("x", lambda v: v + 1e12),
        "C1-nan": set_values("C1", lambda v: np.where(np.arange(len(v)) == 2, np.nan, v)),
        "C3-inf": set_values("C3", lambda v: np.full(len(v), -np.inf)),
        "all-one-pixel": lambda rec: set_values("y", lambda v: np.full(len(v), 50.0))(
            set_values("x", lambda v: np.full(len(v), 60.0))(rec)),
        "zero-rows": lambda rec: rec[:0],
        "one-row": lambda rec: rec[:1],
        "two-d-table": lambda rec: np.zeros((len(rec), 3)),
    }
    for name, fn in field_cases.items():
        case("competition", f"train-{name}", set_fields(tr, fn))
    te = "spots/Test/S_3"
    case("competition", "test-drop-Test_Set", set_fields(te, lambda rec: rfn.drop_fields(rec, "Test_Set",
                                                                                         usemask=False)))
    case("competition", "test-Test_Set-nan", set_fields(te, retype("Test_Set", "<f8", lambda v: np.full(len(v),
                                                                                                     np.nan))))
    case("competition", "test-Test_Set-half", set_fields(te, retype("Test_Set", "<f8", lambda v: v + 0.5)))
    case("competition", "test-Test_Set-strings", set_fields(te, retype("Test_Set", "S4")))
    # all targets the same: convert keeps them, preprocess (training) refuses them
    case("competition", "targets-all-zero", set_fields(tr, lambda rec: _const_targets(rec, 0.0)), preprocess=True)

    def all_half(root: Path):
        for sid in ("S_1", "S_2"):
            set_fields(f"spots/Train/{sid}", lambda rec: _const_targets(rec, 0.5))(root)
    case("competition", "targets-all-half", all_half, preprocess=True)
    # images
    im = "images/Train/S_1"

    def img(fn):
        def edit(f):
            a = f[im][()]
            del f[im]
            f.create_dataset(im, data=fn(a))
        return h5edit(edit)
    case("competition", "image-float32", img(lambda a: a.astype(np.float32)))
    case("competition", "image-float-nan", img(lambda a: np.where(a > 0, np.nan, 0.0).astype(np.float32)))
    case("competition", "image-uint16", img(lambda a: a.astype(np.uint16) * 257))
    case("competition", "image-int8", img(lambda a: (a // 2).astype(np.int8)))
    case("competition", "image-grey-2d", img(lambda a: a[:, :, 0]))
    case("competition", "image-rgba", img(lambda a: np.concatenate([a, np.full(a.shape[:2] + (1,), 255, a.dtype)],
                                                                   axis=2)))
    case("competition", "image-5-channels", img(lambda a: np.concatenate([a, a[:, :, :2]], axis=2)))
    case("competition", "image-1d", img(lambda a: a.ravel()[:100]))
    case("competition", "image-4x4", img(lambda a: a[:4, :4]))
    case("competition", "image-empty", img(lambda a: a[:0, :0]))
    case("competition", "image-strings", img(lambda a: np.array([b"abc"] * 12).reshape(2, 2, 3)))
    for name, shape in {"200000sq": (200_000, 200_000, 3), "40000sq": (40_000, 40_000, 3),
                        "thin": (10, 200_000_000, 3), "4d": (100, 100, 3, 1000)}.items():
        case("competition", f"image-declared-{name}",
             replace_dataset(im, shape=shape, dtype="u1", chunks=(1, 1, 3) + shape[3:]))
    case("competition", "spots-declared-huge",
         replace_dataset(tr, shape=(2_000_000_000,), dtype=[("x", "<f8"), ("y", "<f8"), ("C1", "<f8"),
                                                            ("C2", "<f8"), ("C3", "<f8")], chunks=(1024,)))
    # attributes
    for name, value in {
        "not-json": "[not json", "json-dict": json.dumps({"a": 1}), "ints": np.arange(3), "wrong-count":
        json.dumps(["a", "b"]), "duplicates": json.dumps(["a", "a", "b"]), "empty-name": json.dumps(["", "b", "c"]),
        "bad-utf8": np.bytes_(b"\xff\xfe[\"a\"]"), "hostile": json.dumps(["$x^$", "<script>", "a\\b"]),
        "hostile2": json.dumps(["../x", "a/b", "n" * 300]), "deep": "[" * 5000 + "]" * 5000,
    }.items():
        case("competition", f"attr-target_names-{name}", set_attr("target_names", value),
             preprocess=name in ("hostile", "hostile2"))
    for name, value in {"strings": np.bytes_(b"ab"), "three": np.array([1.0, 2.0, 3.0]),
                        "nan": np.array([np.nan, 0.0])}.items():
        case("competition", f"attr-applied_shift-{name}", set_attr("applied_shift", value, tr))
    for name, value in {"nan": np.nan, "negative": -1.0, "string": "big", "zero": 0.0}.items():
        case("competition", f"attr-um_per_px-{name}", set_attr("um_per_px", value, tr))
    case("competition", "same-slide-in-train-and-test", rename_slide("S_3", "S_1", split="Test"))
    # hostile slide ids (names are data), in a Train slide and in the Test slide
    for key, name in HOSTILE_NAMES.items():
        case("competition", f"name-train-{key}", rename_slide("S_1", name), preprocess=True)
    for key in ("math", "html", "dotdot", "newline"):
        case("competition", f"name-test-{key}", rename_slide("S_3", HOSTILE_NAMES[key], split="Test"),
             preprocess=key in ("math", "dotdot"))


def _const_targets(rec: np.ndarray, value: float) -> np.ndarray:
    rec = rec.copy()
    for c in ("C1", "C2", "C3"):
        rec[c] = value
    return rec


# ---- Space Ranger folder: visium/sample/spatial/{tissue_positions.csv, scalefactors_json.json,
# tissue_hires_image.png} and visium/sample/celltype_proportions.tsv
VIS = "visium/sample"
POS = f"{VIS}/spatial/tissue_positions.csv"
SF = f"{VIS}/spatial/scalefactors_json.json"
HIRES = f"{VIS}/spatial/tissue_hires_image.png"
PROPS = f"{VIS}/celltype_proportions.tsv"


def edit_table(rel: str, fn, sep: str = ",", index_col=None):
    def m(root: Path):
        p = root / rel
        df = pd.read_csv(p, sep=sep, index_col=index_col)
        df = fn(df)
        df.to_csv(p, sep=sep, index=index_col is not None)
    return m


def edit_json(rel: str, fn):
    def m(root: Path):
        p = root / rel
        p.write_text(fn(json.loads(p.read_text())))
    return m


def _visium_cases() -> None:
    for name, rel in {"positions": POS, "scalefactors": SF, "hires": HIRES, "targets": PROPS,
                      "spatial": f"{VIS}/spatial"}.items():
        case("visium", f"drop-{name}", delete(rel))

    def set_col(col, fn):
        return edit_table(POS, lambda df: df.assign(**{col: fn(df[col])}))
    case("visium", "positions-duplicate-barcode", edit_table(POS, lambda df: pd.concat([df, df.iloc[[4]]])))
    case("visium", "positions-duplicate-barcode-other-row",
         edit_table(POS, lambda df: df.assign(barcode=[b if i != 7 else df["barcode"].iloc[2]
                                                       for i, b in enumerate(df["barcode"])])))
    case("visium", "positions-in_tissue-2", set_col("in_tissue", lambda v: v.where(v.index != 3, 2)))
    case("visium", "positions-all-out", set_col("in_tissue", lambda v: v * 0))
    case("visium", "positions-pxl-nan", set_col("pxl_row_in_fullres", lambda v: v.where(v.index != 1, np.nan)))
    case("visium", "positions-pxl-inf", set_col("pxl_col_in_fullres", lambda v: v.where(v.index != 1, np.inf)))
    case("visium", "positions-pxl-string", set_col("pxl_col_in_fullres", lambda v: v.astype(str) + "px"))
    case("visium", "positions-pxl-outside", set_col("pxl_col_in_fullres", lambda v: v + 1e7))
    case("visium", "positions-pxl-negative", set_col("pxl_row_in_fullres", lambda v: -v))
    case("visium", "positions-one-pixel", edit_table(POS, lambda df: df.assign(pxl_row_in_fullres=300,
                                                                                pxl_col_in_fullres=300)))
    case("visium", "positions-no-header-5-columns",
         edit_table(POS, lambda df: df.iloc[:, :5].set_axis([f"c{i}" for i in range(5)], axis=1)))
    case("visium", "positions-renamed-column", edit_table(POS, lambda df: df.rename(columns={"in_tissue": "tis"})))
    case("visium", "positions-empty", write_bytes(POS, b""))
    case("visium", "positions-garbage", write_bytes(POS, bytes(random.Random(1).randrange(256)
                                                               for _ in range(3000))))
    for name, fn in {
        "invalid-json": lambda d: "{not json", "nan": lambda d: json.dumps(dict(d, tissue_hires_scalef=float("nan"))),
        "zero": lambda d: json.dumps(dict(d, tissue_hires_scalef=0)),
        "negative": lambda d: json.dumps(dict(d, tissue_hires_scalef=-0.5)),
        "string": lambda d: json.dumps(dict(d, tissue_hires_scalef="0.5")),
        "bool": lambda d: json.dumps(dict(d, tissue_hires_scalef=True)),
        "huge": lambda d: json.dumps(dict(d, tissue_hires_scalef=1e308)),
        "missing-key": lambda d: json.dumps({k: v for k, v in d.items() if k != "tissue_hires_scalef"}),
        "list": lambda d: json.dumps([d]), "deep": lambda d: "[" * 100_000 + "]" * 100_000,
        "diameter-inf": lambda d: json.dumps(dict(d, spot_diameter_fullres=float("inf"))),
    }.items():
        case("visium", f"scalefactors-{name}", edit_json(SF, fn))
    case("visium", "image-truncated", truncate_at(HIRES, 0.4))
    case("visium", "image-zero-bytes", write_bytes(HIRES, b""))
    case("visium", "image-text", write_bytes(HIRES, b"this is not a png\n" * 10))
    case("visium", "image-declared-huge", write_bytes(HIRES, huge_png(60_000, 60_000)))
    case("visium", "image-declared-wide", write_bytes(HIRES, huge_png(2_000_000_000, 1)))

    def reimage(fn):
        def m(root: Path):
            p = root / HIRES
            Image.fromarray(fn(np.asarray(Image.open(p)))).save(p)
        return m
    case("visium", "image-rgba-transparent",
         reimage(lambda a: np.concatenate([a, np.full(a.shape[:2] + (1,), 7, np.uint8)], axis=2)))
    case("visium", "image-grey", reimage(lambda a: a[:, :, 0]))
    case("visium", "image-tiny", reimage(lambda a: a[:6, :6]))

    def props(fn):
        return edit_table(PROPS, fn, sep="\t", index_col=0)
    case("visium", "targets-nan", props(lambda df: df.mask(np.arange(df.size).reshape(df.shape) == 4)))
    case("visium", "targets-string-column", props(lambda df: df.assign(T2="abc")))
    case("visium", "targets-duplicate-barcode", props(lambda df: pd.concat([df, df.iloc[[1]]])))
    case("visium", "targets-no-match", props(lambda df: df.set_axis([f"X{i}" for i in range(len(df))])))
    case("visium", "targets-counts", props(lambda df: (df * 50).round().astype(int) + 2))
    case("visium", "targets-all-zero", props(lambda df: df * 0), preprocess=True)
    case("visium", "targets-inf", props(lambda df: df.replace(df.iloc[0, 0], np.inf)))
    case("visium", "targets-empty", write_bytes(PROPS, b""))
    for key, name in FS_NAMES.items():
        case("visium", f"folder-name-{key}", rename(VIS, name), preprocess=key in ("math", "html", "long"))


# ---- legacy ST (MOB-like): legacy/{M1,M2}.png, alignment_table_{M1,M2}.tsv, {M1,M2}.tsv
LEG = "legacy"
ALIGN = f"{LEG}/alignment_table_M1.tsv"
LTARGETS = f"{LEG}/M1.tsv"
LIMAGE = f"{LEG}/M1.png"


def _legacy_cases() -> None:
    def spots(fn):
        return edit_table(ALIGN, fn, sep="\t")
    case("legacy", "spots-one-pixel", spots(lambda df: df.assign(pixel_x=100.0, pixel_y=120.0)))
    case("legacy", "spots-pixel-nan", spots(lambda df: df.assign(pixel_x=df["pixel_x"].where(df.index != 2))))
    case("legacy", "spots-pixel-inf", spots(lambda df: df.assign(pixel_y=df["pixel_y"].replace(
        df["pixel_y"].iloc[0], np.inf))))
    case("legacy", "spots-pixel-string", spots(lambda df: df.assign(pixel_x="left")))
    case("legacy", "spots-none-selected", spots(lambda df: df.assign(selected=0)))
    case("legacy", "spots-duplicate-position", spots(lambda df: pd.concat([df, df.iloc[[3]]])))
    case("legacy", "spots-missing-column", spots(lambda df: df.drop(columns="pixel_y")))
    case("legacy", "spots-array-fractional", spots(lambda df: df.assign(x=df["x"] + 0.5)))
    case("legacy", "spots-array-collinear", spots(lambda df: df.assign(y=0, x=np.arange(len(df)))))
    case("legacy", "spots-empty", write_bytes(ALIGN, b"x\ty\tpixel_x\tpixel_y\tselected\n"))
    case("legacy", "spots-garbage", write_bytes(ALIGN, bytes(random.Random(2).randrange(256) for _ in range(2000))))

    def targets(fn):
        return edit_table(LTARGETS, fn, sep="\t", index_col=0)
    case("legacy", "targets-nan", targets(lambda df: df.mask(np.arange(df.size).reshape(df.shape) == 1)))
    case("legacy", "targets-string-column", targets(lambda df: df.assign(C2="x")))
    case("legacy", "targets-duplicate-key", targets(lambda df: pd.concat([df, df.iloc[[0]]])))
    case("legacy", "targets-no-match", targets(lambda df: df.set_axis([f"{i}x999" for i in range(len(df))])))
    case("legacy", "targets-negative", targets(lambda df: -df))
    case("legacy", "targets-empty", write_bytes(LTARGETS, b""))
    case("legacy", "image-truncated", truncate_at(LIMAGE, 0.3))
    case("legacy", "image-zero-bytes", write_bytes(LIMAGE, b""))
    case("legacy", "image-missing", delete(LIMAGE))
    case("legacy", "image-declared-huge", write_bytes(LIMAGE, huge_png(50_000, 50_000)))

    def rename_section(new: str):
        def m(root: Path):
            leg = root / LEG
            for old, nw in (("M1.png", f"{new}.png"), ("alignment_table_M1.tsv", f"alignment_table_{new}.tsv"),
                            ("M1.tsv", f"{new}.tsv")):
                (leg / old).rename(leg / nw)
        return m
    for key, name in FS_NAMES.items():
        case("legacy", f"section-name-{key}", rename_section(name), preprocess=key in ("math", "glob"))


# ---- AnnData: data.h5ad written by hevisum (slides S_1, S_2 Train, S_3 Test)
H5AD = "data.h5ad"


def h5ad_edit(fn):
    def m(root: Path):
        with h5py.File(root / H5AD, "a") as f:
            fn(f)
    return m


def _h5ad_cases() -> None:
    r = _rng("h5ad-truncate")
    for i, frac in enumerate([0.0] + [r.uniform(0.05, 0.95) for _ in range(4)]):
        case("h5ad", f"truncate{i}-{frac:.3f}", truncate_at(H5AD, frac))
    r = _rng("h5ad-corrupt")
    for i in range(3):
        case("h5ad", f"corrupt{i}", corrupt(H5AD, r.randrange(10**9), n=r.choice([2, 16])))

    def replace(name, **kw):
        def edit(f):
            attrs = dict(f[name].attrs) if name in f else {}
            del f[name]
            ds = f.create_dataset(name, **kw)
            for k, v in attrs.items():
                ds.attrs[k] = v
        return h5ad_edit(edit)
    n = "obsm/spatial"
    case("h5ad", "spatial-strings", h5ad_edit(lambda f: _swap(f, n, lambda a: a.astype("S8"))))
    case("h5ad", "spatial-one-column", h5ad_edit(lambda f: _swap(f, n, lambda a: a[:, :1])))
    case("h5ad", "spatial-nan", h5ad_edit(lambda f: _swap(f, n, lambda a: np.where(a > a.mean(), np.nan, a))))
    case("h5ad", "spatial-dropped", h5ad_edit(lambda f: f.__delitem__(n)))
    case("h5ad", "uns-spatial-dropped", h5ad_edit(lambda f: f.__delitem__("uns/spatial")))
    hires = "uns/spatial/S_1/images/hires"
    case("h5ad", "image-declared-huge", replace(hires, shape=(100_000, 100_000, 3), dtype="u1", chunks=(1, 1, 3)))
    case("h5ad", "array-declared-huge", replace("uns/spatial/S_1/scalefactors/spot_diameter_fullres",
                                                shape=(10**11,), dtype="f8", chunks=(1024,)))
    case("h5ad", "image-float", h5ad_edit(lambda f: _swap(f, hires, lambda a: a.astype(np.float32) * 3)))
    case("h5ad", "image-2x2", h5ad_edit(lambda f: _swap(f, hires, lambda a: a[:2, :2])))
    sc = "uns/spatial/S_1/scalefactors/tissue_hires_scalef"
    case("h5ad", "scalef-nan", h5ad_edit(lambda f: _swap(f, sc, lambda a: np.float64(np.nan))))
    case("h5ad", "scalef-negative", h5ad_edit(lambda f: _swap(f, sc, lambda a: np.float64(-2.0))))
    case("h5ad", "scalef-string", h5ad_edit(lambda f: _string_at(f, sc, "big")))
    case("h5ad", "um_per_px-nan", h5ad_edit(lambda f: _scalar_like(f, sc, "uns/spatial/S_1/metadata/um_per_px",
                                                                  np.nan)))
    case("h5ad", "um_per_px-zero", h5ad_edit(lambda f: _scalar_like(f, sc, "uns/spatial/S_1/metadata/um_per_px",
                                                                   0.0)))
    case("h5ad", "applied_shift-string", h5ad_edit(lambda f: _string_at(f, "uns/spatial/S_1/metadata/applied_shift",
                                                                       "left")))
    case("h5ad", "X-nan", h5ad_edit(lambda f: _swap(f, "X", lambda a: np.where(a > a.mean(), np.nan, a))))
    case("h5ad", "X-inf", h5ad_edit(lambda f: _swap(f, "X", lambda a: np.full_like(a, np.inf))))


def _string_at(f, name: str, value: str) -> None:
    """A string scalar at ``name``, encoded as AnnData encodes strings."""
    if name in f:
        del f[name]
    f.create_dataset(name, data=value, dtype=h5py.string_dtype())
    f[name].attrs.update({"encoding-type": "string", "encoding-version": "0.2.0"})


def _scalar_like(f, like: str, name: str, value: float) -> None:
    """A numeric scalar at ``name``, encoded as AnnData encodes the scalar ``like``."""
    if name in f:
        del f[name]
    ds = f.create_dataset(name, data=np.float64(value))
    for k, v in f[like].attrs.items():
        ds.attrs[k] = v


def _swap(f, name: str, fn) -> None:
    a = f[name][()]
    attrs = dict(f[name].attrs)
    del f[name]
    ds = f.create_dataset(name, data=fn(a))
    for k, v in attrs.items():
        ds.attrs[k] = v


def _h5ad_named_cases() -> None:
    for key in ("math", "html", "unicode", "long", "dotdot", "backslash", "newline"):
        case("h5ad", f"slide-name-{key}", None, preprocess=key in ("math", "long"))


# ---- config for `hevisum preprocess` on the valid competition file
def _config_cases() -> None:
    floats = ["tissue.blur_sigma", "realign.max_shift_pitches", "realign.min_gain", "realign.blur_pitches",
              "spots.window_pitches", "spots.min_tissue", "targets.tie_tol", "tiles.scale", "tiles.pitch_px",
              "stain.min_tissue", "smoothing.sigma_pitches", "train.lr", "train.weight_decay"]
    bad = ["nan", "inf", "-inf", "-1.0", "1e300", "-nan"]
    r = _rng("config-floats")
    for key in floats:
        for v in r.sample(bad, 3):
            case("config", f"{key}={v}", None, config=_toml(key, v), convert=False)
    ints = ["stain.n_patches", "stain.patch_size", "tissue.max_side", "tiles.size", "stain.seed", "seed"]
    for key in ints:
        for v in ("-1", "9223372036854775807"):
            case("config", f"{key}={v}", None, config=_toml(key, v), convert=False)
    for name, text in {
        "method-unknown": "[stain]\nmethod = 'x'\n", "background-int": "[tissue]\nbackground = 1\n",
        "unknown-key": "[tiles]\nsizes = 9\n", "unknown-section": "[nope]\na = 1\n",
        "manual-nan": "[realign.manual]\nS_1 = [nan, 0]\n", "manual-huge": "[realign.manual]\nS_1 = [1e300, 0]\n",
        "manual-string": "[realign.manual]\nS_1 = 'a'\n", "manual-unknown-slide": "[realign.manual]\nS_9 = [1, 2]\n",
        "manual-hostile-key": "[realign.manual]\n\"a\\nb\" = [1, 2]\n",
        "section-is-value": "tiles = 3\n", "syntax-error": "[tiles\nsize = 9\n",
        "profile-unknown": "profile = 'turbo'\n", "tiles-size-not-multiple": "[tiles]\nsize = 10\n",
        "deep-inline": "a = " + "[" * 3000 + "]" * 3000 + "\n",
    }.items():
        case("config", name, None, config=text, convert=False)
    case("config", "binary-garbage", None, config=bytes(random.Random(3).randrange(256) for _ in range(500)),
         convert=False)
    case("config", "empty-file", None, config="", convert=False)


def _toml(key: str, value: str) -> str:
    if "." in key:
        section, k = key.split(".")
        return f"[{section}]\n{k} = {value}\n"
    return f"{key} = {value}\n"


_competition_cases()
_visium_cases()
_legacy_cases()
_h5ad_cases()
_h5ad_named_cases()
_config_cases()


# ------------------------------------------------------------------------------------------- bases
@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """Valid small inputs of every format, and the outputs of a first successful run of each command."""
    from hevisum.demo import DemoSpec, make_demo_slides
    from hevisum.io.anndata_io import write_h5ad
    from hevisum.io.competition import write_competition_h5

    root = tmp_path_factory.mktemp("fuzz-bases")
    slides = make_demo_slides(DemoSpec(seed=0, n_train=2, n_test=1, n_spots=20, n_targets=3))
    write_competition_h5(slides, root / COMP)
    write_h5ad(slides, root / H5AD)
    _write_visium(root / VIS, slides[0])
    _write_legacy(root / LEG, make_demo_slides(DemoSpec(seed=1, n_train=2, n_test=1, n_spots=20, n_targets=3,
                                                         grid="square")))
    # previous outputs of each command, to be replaced on success and left alone on failure
    prev = root / "previous"
    prev.mkdir()
    (prev / "fast.toml").write_text(FAST_CONFIG)
    assert main(["convert", str(root / COMP), str(prev / "out.h5")]) == 0
    assert main(["preprocess", str(root / COMP), "--out", str(prev / "work"), "--quiet", "--config",
                 str(prev / "fast.toml")]) == 0
    return root


def _write_visium(folder: Path, s) -> None:
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    scalef = 0.5
    Image.fromarray(s.image).save(spatial / "tissue_hires_image.png")
    n = s.n_spots
    barcodes = [f"AC{i:04d}-1" for i in range(n + 3)]
    xy = np.concatenate([s.xy, [[5.0, 5.0], [6.0, 5.0], [7.0, 5.0]]]) / scalef
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": [1] * n + [0] * 3, "array_row": np.arange(n + 3),
                        "array_col": np.arange(n + 3), "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]})
    pos.to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": scalef,
                                                                "tissue_lowres_scalef": 0.1,
                                                                "spot_diameter_fullres": 30.0}))
    props = pd.DataFrame(s.targets, index=barcodes[:n], columns=["T1", "T2", "T3"])
    props.index.name = "barcode"
    props.to_csv(folder / "celltype_proportions.tsv", sep="\t")


def _write_legacy(folder: Path, slides) -> None:
    folder.mkdir(parents=True)
    for sec, s in zip(("M1", "M2"), slides):
        Image.fromarray(s.image).save(folder / f"{sec}.png")
        pitch = s.meta["pitch_px"]
        ax = np.rint((s.xy[:, 0] - s.xy[:, 0].min()) / pitch).astype(int) + 1
        ay = np.rint((s.xy[:, 1] - s.xy[:, 1].min()) / pitch).astype(int) + 1
        pd.DataFrame({"x": ax, "y": ay, "pixel_x": s.xy[:, 0], "pixel_y": s.xy[:, 1], "selected": 1}).to_csv(
            folder / f"alignment_table_{sec}.tsv", sep="\t", index=False)
        pd.DataFrame(s.targets if s.targets is not None else s.meta["truth"],
                     index=[f"{x}x{y}" for x, y in zip(ax, ay)], columns=["C1", "C2", "C3"]).to_csv(
            folder / f"{sec}.tsv", sep="\t")


# ------------------------------------------------------------------------------------------- checks
def _listing(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: folders as ('dir',), files as (size, sha1)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = ("link", os.readlink(p))
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (os.path.getsize(p), hashlib.sha1(fh.read()).hexdigest())
    return out


# Warnings a command-line run prints on stderr (Python hides these categories by default outside __main__).
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of one in-process run; warnings it emits are added to stderr as a real run would
    print them."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: not expected from these command lines
            rc = e.code
        except BaseException:  # noqa: BLE001 - anything escaping main is the failure this suite looks for
            pytest.fail(f"exception escaped hevisum.cli.main({argv!r}):\n{traceback.format_exc()}")
    _, err = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, _HIDDEN)]
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown)
    return rc, err


def _check(argv: list[str], capsys, root: Path, out_rel: str) -> int:
    """Run one command; check exit code, stderr, what changed in ``root`` and the previous output."""
    before = _listing(root)
    rc, err = _run(argv, capsys)
    after = _listing(root)
    assert "Traceback" not in err, err
    if rc != 0:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    outside = sorted(k for k in changed if k != out_rel and not k.startswith(out_rel + os.sep))
    assert not outside, f"written outside {out_rel}: {outside[:10]}"
    if rc != 0:
        assert not changed, f"the existing output changed on failure: {sorted(changed)[:10]}"
    return rc


@pytest.mark.parametrize("c", CASES, ids=[c.id.encode("unicode_escape").decode("ascii") for c in CASES])
def test_hostile_input(c: Case, bases: Path, tmp_path: Path, capsys, monkeypatch):
    root = tmp_path / "tree"
    root.mkdir()
    cwd = root / "cwd"  # relative writes would land here, inside the listed tree
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    src = {"competition": COMP, "h5ad": H5AD, "visium": VIS, "legacy": LEG, "config": COMP}[c.fmt]
    (shutil.copytree if (bases / src).is_dir() else shutil.copy)(bases / src, root / src)
    inp = root / src
    if c.mutate is not None:
        inp = c.mutate(root) or inp
        if c.fmt == "visium" and not inp.exists():  # the sample folder was renamed
            inp = next(p for p in (root / "visium").iterdir())
    if c.fmt == "h5ad" and c.id.startswith("h5ad-slide-name-"):
        _write_named_h5ad(bases, inp, HOSTILE_NAMES[c.id[len("h5ad-slide-name-"):]])
    if c.fmt == "legacy":
        inp = root / LEG
    shutil.copy(bases / "previous" / "out.h5", root / "out.h5")
    shutil.copytree(bases / "previous" / "work", root / "work")
    ran = 0
    rc = None
    if c.convert:
        rc = _check(["convert", str(inp), str(root / "out.h5")], capsys, root, "out.h5")
        ran += 1
    if c.config is not None:
        cfg = root / "config.toml"
        cfg.write_bytes(c.config if isinstance(c.config, bytes) else c.config.encode())
        _check(["preprocess", str(inp), "--out", str(root / "work"), "--quiet", "--config", str(cfg)], capsys, root,
               "work")
        ran += 1
    elif c.preprocess and rc == 0:
        cfg = root / "fast.toml"
        cfg.write_text(FAST_CONFIG)
        _check(["preprocess", str(inp), "--out", str(root / "work"), "--quiet", "--config", str(cfg)], capsys, root,
               "work")
        ran += 1
    assert ran


def _write_named_h5ad(bases: Path, path: Path, name: str) -> None:
    """The base .h5ad with slide S_1 renamed (through hevisum's own reader and writer)."""
    from dataclasses import replace

    from hevisum.io.anndata_io import read_h5ad, write_h5ad

    slides = [replace(s, slide_id=name) if s.slide_id == "S_1" else s for s in read_h5ad(bases / H5AD)]
    path.unlink()
    try:
        write_h5ad(slides, path)
    except Exception:  # noqa: BLE001 - a name AnnData cannot store: the file is then the unchanged base
        shutil.copy(bases / H5AD, path)


def test_enough_cases_and_unique_ids():
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.preprocess or c.config is not None for c in CASES) >= 60
