"""The competition HDF5 layout (Kaggle "EL Hackathon 2025").

    images/Train/<slide>   uint8 (H, W, 3)
    images/Test/<slide>    uint8 (H, W, 3)
    spots/Train/<slide>    structured array: x, y, C1..Cn
    spots/Test/<slide>     structured array: x, y, Test_Set
    attrs["target_names"]  optional JSON list naming C1..Cn

Spot ids are the row index in ``spots/<split>/<slide>`` (the submission's ``ID``).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError
from hevisum.io.atomic import atomic_path
from hevisum.slide import Slide, check_same_targets, check_unique_ids

_SPLIT_GROUPS = {"Train": "train", "Test": "test"}
_TARGET_RE = re.compile(r"^C(\d+)$")


def is_competition_h5(path: str | Path) -> bool:
    """True when ``path`` is an HDF5 file with ``images`` and ``spots`` groups."""
    import h5py

    p = Path(path)
    if not p.is_file() or not h5py.is_hdf5(p):
        return False
    with h5py.File(p, "r") as f:
        return "images" in f and "spots" in f


def read_competition_h5(path: str | Path, test_slides: list[str] | None = None) -> list[Slide]:
    """Read every slide of a competition-layout HDF5 file.

    ``test_slides`` moves named Train slides to the test split (their targets are kept in ``meta``
    as truth but not used for training). Each image's declared shape is checked against
    :data:`hevisum.io.images.MAX_PIXELS` before anything is read.
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise HevisumError(f"input file {str(p)!r} not found")
    if not h5py.is_hdf5(p):
        raise HevisumError(f"{p}: not an HDF5 file; expected the competition layout (images/, spots/)")
    slides: list[Slide] = []
    with open_h5(p) as f:
        for group in ("images", "spots"):
            if group not in f:
                raise HevisumError(f"{p}: missing group {group!r}; expected images/{{Train,Test}}/<slide> and "
                                   f"spots/{{Train,Test}}/<slide> (found {sorted(f.keys())})")
            if not isinstance(f[group], h5py.Group):
                raise HevisumError(f"{p}: {group!r} is a dataset; expected a group holding Train/ and Test/")
        names = _target_names_attr(f, p)
        for split_group, split in _SPLIT_GROUPS.items():
            ig = _split_group(f, p, "images", split_group)
            sg = _split_group(f, p, "spots", split_group)
            if ig is None and sg is None:
                continue
            img_names = set(ig.keys()) if ig is not None else set()
            spot_names = set(sg.keys()) if sg is not None else set()
            for sid in sorted(img_names | spot_names, key=_natural_key):
                shown = _printable(sid)
                if sid not in spot_names:
                    raise HevisumError(f"{p}: slide {sid!r} has images/{split_group}/{shown} but no "
                                       f"spots/{split_group}/{shown}")
                if sid not in img_names:
                    raise HevisumError(f"{p}: slide {sid!r} has spots/{split_group}/{shown} but no "
                                       f"images/{split_group}/{shown}")
                ids = _dataset(ig, sid, p, f"images/{split_group}", "an image dataset (H, W, 3) uint8")
                sds = _dataset(sg, sid, p, f"spots/{split_group}", "a table dataset with fields x, y, C1..Cn")
                image = _read_image(ids, p, f"images/{split_group}/{shown}")
                rec = _read_spots(sds, p, f"spots/{split_group}/{shown}")
                slides.append(_slide_from_records(p, sid, split, image, rec, names, _attrs(sds, p)))
    if not slides:
        raise HevisumError(f"{p}: no slides under images/Train or images/Test")
    for tid in test_slides or []:
        match = [s for s in slides if s.slide_id == tid]
        if not match:
            raise HevisumError(f"{p}: --test slide {tid!r} not found; slides are {[s.slide_id for s in slides]}")
        s = match[0]
        if s.targets is not None:
            s.meta["truth"] = s.targets
            s.meta["truth_names"] = s.target_names
        s.targets, s.split = None, "test"
    check_unique_ids(slides)
    for s in slides:
        s.validate()
    check_same_targets(slides)
    return slides


# Most spots one slide may declare: far beyond any array (Visium HD bins are pooled before this point).
MAX_SPOTS = 10_000_000


@contextlib.contextmanager
def open_h5(p: Path) -> Iterator:
    """``h5py.File(p, 'r')``, with a damaged file (truncated, corrupt) or a read failure inside it as one
    :class:`HevisumError` naming the file."""
    import h5py

    try:
        f = h5py.File(p, "r")
    except (OSError, ValueError) as e:
        raise HevisumError(f"{p}: cannot open as HDF5 ({_first_line(e)}); the file may be truncated or damaged: "
                           "write or copy it again") from None
    try:
        with f:
            yield f
    except (OSError, RuntimeError) as e:
        raise HevisumError(f"{p}: cannot read the HDF5 file ({_first_line(e)}); it may be damaged: write or copy "
                           "it again") from None


def _printable(name: str) -> str:
    """``name`` for a message: control characters (a newline in a slide id...) escaped, so it stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _split_group(f, p: Path, group: str, split_group: str):
    """``f[group][split_group]`` as a group, None when absent; a dataset there is an error."""
    import h5py

    g = f[group].get(split_group)
    if g is not None and not isinstance(g, h5py.Group):
        raise HevisumError(f"{p}: {group}/{split_group} is a dataset; expected a group with one dataset per slide")
    return g


def _dataset(group, sid: str, p: Path, where: str, expected: str):
    """The dataset ``group[sid]``; a group (``<slide>/<more>``) or a dangling link is an error."""
    import h5py

    shown = _printable(sid)
    try:
        obj = group.get(sid)
    except (KeyError, OSError, RuntimeError) as e:
        raise HevisumError(f"{p}: {where}/{shown} cannot be read ({_first_line(e)}); expected {expected}") from None
    if obj is None:
        raise HevisumError(f"{p}: {where}/{shown} is a broken link; expected {expected}")
    if isinstance(obj, h5py.Group):
        inner = sorted(obj.keys())[:5]
        raise HevisumError(f"{p}: {where}/{shown} is a group (holding {inner}), not a dataset; expected one slide per "
                           f"name directly under {where}/, each {expected} (slide ids cannot contain '/')")
    if not isinstance(obj, h5py.Dataset):
        raise HevisumError(f"{p}: {where}/{shown} is not a dataset; expected {expected}")
    return obj


def _read_image(ds, p: Path, where: str) -> np.ndarray:
    """The image dataset, read only after its declared shape and type are checked."""
    from hevisum.io.images import MAX_PIXELS

    shape = ds.shape
    if shape is None or len(shape) != 3 or shape[2] not in (3, 4):
        raise HevisumError(f"{p}: {where} has shape {shape}; expected an RGB image of shape (H, W, 3)")
    h, w = int(shape[0]), int(shape[1])
    if h * w > MAX_PIXELS:
        raise HevisumError(
            f"{p}: {where} declares a {w}x{h} px image ({w * h / 1e6:.0f} Mpx, {w * h * 3 / 2**30:.1f} GiB), above "
            f"the {MAX_PIXELS / 1e6:.0f} Mpx limit; store a downscaled copy (and scale the spot coordinates)"
        )
    if ds.dtype != np.uint8:
        raise HevisumError(f"{p}: {where} has type {ds.dtype}; expected uint8 (0-255) RGB")
    if shape[2] == 4:
        raise HevisumError(f"{p}: {where} is RGBA (H, W, 4); expected RGB (H, W, 3): drop the alpha channel")
    return np.asarray(ds[()])


def _read_spots(ds, p: Path, where: str) -> np.ndarray:
    """The spots table dataset: one-dimensional, structured, numeric fields; checked before it is read."""
    shape = ds.shape
    names = ds.dtype.names or ()
    if shape is None or len(shape) != 1 or not names:
        raise HevisumError(f"{p}: {where} has shape {shape} and type {ds.dtype}; expected a one-dimensional table "
                           "with named fields x, y, C1..Cn (Train) or x, y, Test_Set (Test)")
    if shape[0] > MAX_SPOTS:
        raise HevisumError(f"{p}: {where} declares {shape[0]} spots, above the limit of {MAX_SPOTS}")
    for name in names:
        sub = ds.dtype.fields[name][0]
        if sub.kind not in "iuf" or sub.shape:
            raise HevisumError(f"{p}: {where} field {name!r} has type {sub}; expected numbers (int or float)")
    return ds[()]


def _attrs(ds, p: Path) -> dict:
    try:
        return dict(ds.attrs)
    except (OSError, RuntimeError, TypeError, ValueError) as e:
        raise HevisumError(f"{p}: cannot read the attributes of {ds.name} ({_first_line(e)})") from None


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _target_names_attr(f, p: Path) -> list[str] | None:
    raw = f.attrs.get("target_names")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        try:
            names = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise HevisumError(f"{p}: attribute 'target_names' is not a JSON list of strings") from None
    else:
        names = [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)
                 for x in np.asarray(raw).ravel()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HevisumError(f"{p}: attribute 'target_names' must be a list of strings")
    return names


def _slide_from_records(p: Path, sid: str, split: str, image: np.ndarray, rec: np.ndarray,
                        names: list[str] | None, attrs: dict) -> Slide:
    where = f"{p}: spots/{'Train' if split == 'train' else 'Test'}/{_printable(sid)}"
    fields = rec.dtype.names or ()
    for col in ("x", "y"):
        if col not in fields:
            raise HevisumError(f"{where}: missing field {col!r}; fields are {list(fields)} (expected x, y, C1..Cn)")
    spots = pd.DataFrame({
        "spot_id": np.arange(len(rec)).astype(str),
        "x": rec["x"].astype(np.float64),
        "y": rec["y"].astype(np.float64),
    })
    if "Test_Set" in fields:
        ts = rec["Test_Set"]
        bad = ~np.isfinite(ts) if ts.dtype.kind == "f" else np.zeros(len(ts), bool)
        if bad.any() or (ts.dtype.kind == "f" and not np.array_equal(ts, np.round(ts))):
            i = int(np.flatnonzero(bad)[0]) if bad.any() else int(np.flatnonzero(ts != np.round(ts))[0])
            raise HevisumError(f"{where}: field 'Test_Set' of spot {i} is {float(ts[i]):g}; expected an integer")
        spots["test_set"] = ts.astype(np.int64)
    tcols = sorted((c for c in fields if _TARGET_RE.match(c)), key=lambda c: int(c[1:]))
    targets = None
    target_names = None
    if split == "train":
        if not tcols:
            raise HevisumError(f"{where}: training spots have no target fields C1..Cn; fields are {list(fields)}")
        expected = [f"C{i + 1}" for i in range(len(tcols))]
        if tcols != expected:
            raise HevisumError(f"{where}: target fields {tcols[:5]}... are not C1..C{len(tcols)} without gaps")
        targets = np.stack([rec[c].astype(np.float64) for c in tcols], axis=1)
        if names is not None and len(names) != len(tcols):
            raise HevisumError(f"{p}: attribute target_names has {len(names)} names but {sid!r} has {len(tcols)} "
                               "target fields C1..Cn")
        target_names = list(names) if names is not None else tcols
    meta: dict = {}
    if "applied_shift" in attrs:
        v = _numbers(attrs["applied_shift"])
        if v is None or len(v) != 2:
            raise HevisumError(f"{where}: attribute 'applied_shift' is {_shown_attr(attrs['applied_shift'])}; "
                               "expected two finite numbers (dx, dy) in pixels")
        meta["applied_shift"] = tuple(v)
    if "um_per_px" in attrs:
        v = _numbers(attrs["um_per_px"])
        if v is None or len(v) != 1 or not 0 < v[0] < 1e4:
            raise HevisumError(f"{where}: attribute 'um_per_px' is {_shown_attr(attrs['um_per_px'])}; expected one "
                               "positive number (microns per pixel)")
        meta["um_per_px"] = v[0]
    return Slide(slide_id=sid, image=image, spots=spots, targets=targets, target_names=target_names,
                 um_per_px=meta.get("um_per_px"), split=split, source=str(p), meta=meta)


def _shown_attr(value) -> str:
    a = np.asarray(value)
    v = a.tolist()
    if isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
    return repr(v)[:100]


def _numbers(value) -> list[float] | None:
    """An attribute as a list of finite floats, or None when it is not one."""
    a = np.asarray(value).ravel()
    if a.dtype.kind not in "iuf" or not np.isfinite(a).all():
        return None
    return [float(v) for v in a]


def write_competition_h5(slides: list[Slide], path: str | Path) -> None:
    """Write slides in the competition layout, atomically (temp file, then rename).

    Train slides need targets; their names go to the file attribute ``target_names``. Test spots get
    ``Test_Set`` from the spots column ``test_set`` when present, else 1. Coordinates are rounded to
    integers as in the competition file. Slide metadata ``applied_shift`` and ``um_per_px`` are kept as
    attributes of the spots dataset.
    """
    import h5py

    check_unique_ids(slides)
    names = check_same_targets([s for s in slides if s.split == "train"])
    for s in slides:
        s.validate()
        if "/" in s.slide_id or "\0" in s.slide_id or s.slide_id in (".", ".."):
            raise HevisumError(f"{s.where()}: slide id {s.slide_id!r} cannot name an HDF5 dataset (no '/', NUL, "
                               "'.' or '..'); rename the slide, or write .h5ad instead")
        if s.split == "train" and s.targets is None:
            raise HevisumError(f"{s.where()}: a Train slide needs targets; mark it as Test instead "
                               f"(--test {s.slide_id!r})")
    n_targets = len(names) if names else 0
    from hevisum import __version__

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["written_by"] = f"hevisum {__version__}"  # so a later write may replace it (see check_output_file)
            if names:
                f.attrs["target_names"] = json.dumps(names)
            for s in slides:
                grp = "Train" if s.split == "train" else "Test"
                f.create_dataset(f"images/{grp}/{s.slide_id}", data=s.image, compression="gzip",
                                 compression_opts=1, chunks=(min(256, s.image.shape[0]), min(256, s.image.shape[1]), 3))
                xy = np.rint(s.xy).astype(np.int64)
                if s.split == "train":
                    dtype = [("x", "<i8"), ("y", "<i8")] + [(f"C{i + 1}", "<f8") for i in range(n_targets)]
                    rec = np.zeros(s.n_spots, dtype=dtype)
                    for i in range(n_targets):
                        rec[f"C{i + 1}"] = s.targets[:, i]
                else:
                    rec = np.zeros(s.n_spots, dtype=[("x", "<i8"), ("y", "<i8"), ("Test_Set", "<i8")])
                    rec["Test_Set"] = s.spots["test_set"].to_numpy() if "test_set" in s.spots else 1
                rec["x"], rec["y"] = xy[:, 0], xy[:, 1]
                ds = f.create_dataset(f"spots/{grp}/{s.slide_id}", data=rec)
                if "applied_shift" in s.meta:
                    ds.attrs["applied_shift"] = np.asarray(s.meta["applied_shift"], dtype=np.float64)
                if s.um_per_px:
                    ds.attrs["um_per_px"] = float(s.um_per_px)
