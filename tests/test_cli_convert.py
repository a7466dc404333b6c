"""`hevisum convert` end to end (subprocess): real folders in, competition HDF5 out, same slides back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hevisum.io import read_input
from hevisum.io.anndata_io import read_h5ad
from hevisum.io.competition import read_competition_h5

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "hevisum.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_same_slides(written, read_directly) -> None:
    by_id = {s.slide_id: s for s in written}
    assert sorted(by_id) == sorted(s.slide_id for s in read_directly)
    for s in read_directly:
        w = by_id[s.slide_id]
        assert (w.split, w.n_spots) == (s.split, s.n_spots)
        np.testing.assert_array_equal(w.image, s.image)
        np.testing.assert_allclose(w.xy, s.xy, atol=0.5)  # stored as integer pixels
        assert w.um_per_px == pytest.approx(s.um_per_px)
        if s.targets is not None:
            assert w.target_names == s.target_names
            np.testing.assert_array_equal(w.targets, s.targets)
        else:
            assert w.targets is None


@pytest.mark.shared
def test_convert_mob_folder_with_test_slide(shared_data, tmp_path):
    out = tmp_path / "mob.h5"
    r = run_cli("convert", shared_data / "mob", out, "--test", "MOB3")
    assert r.returncode == 0, r.stderr
    assert "3 slide(s), 2 Train, 1 Test" in r.stdout
    written = read_competition_h5(out)
    assert [(s.slide_id, s.split) for s in written] == [("MOB1", "train"), ("MOB2", "train"), ("MOB3", "test")]
    assert_same_slides(written, read_input(shared_data / "mob", test_slides=["MOB3"], progress=False))
    # and the same targets as the organisers' file, which was made the same way
    ref = {s.slide_id: s for s in read_competition_h5(shared_data / "challenge" / "mob.h5")}
    np.testing.assert_allclose(written[0].targets, ref["MOB1"].targets, rtol=1e-12)
    assert written[0].target_names == ref["MOB1"].target_names


@pytest.mark.shared
def test_convert_visium_gbm(shared_data, tmp_path):
    out = tmp_path / "gbm.h5"
    r = run_cli("convert", shared_data / "visium_gbm", out)
    assert r.returncode == 0, r.stderr
    (w,) = read_competition_h5(out)
    assert w.slide_id == "visium_gbm" and w.split == "train" and w.targets.shape == (1935, 54)
    assert_same_slides([w], read_input(shared_data / "visium_gbm"))


@pytest.mark.shared
def test_convert_to_h5ad(shared_data, tmp_path):
    out = tmp_path / "mob.h5ad"
    r = run_cli("convert", shared_data / "mob", out, "--test", "MOB3", "--top-genes", "20")
    assert r.returncode == 0, r.stderr
    back = read_h5ad(out)
    direct = read_input(shared_data / "mob", test_slides=["MOB3"], top_genes=20, progress=False)
    for b, d in zip(back, direct):
        assert (b.slide_id, b.split, b.spot_ids.tolist()) == (d.slide_id, d.split, d.spot_ids.tolist())
        np.testing.assert_array_equal(b.xy, d.xy)
        if d.targets is not None:
            np.testing.assert_array_equal(b.targets, d.targets)
            assert b.target_names == d.target_names and len(b.target_names) == 20
    np.testing.assert_array_equal(back[2].meta["truth"], direct[2].meta["truth"])


def test_convert_missing_input_is_one_clean_error(tmp_path):
    out = tmp_path / "out.h5"
    missing = tmp_path / "no_such_folder"
    r = run_cli("convert", missing, out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "supported inputs" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_convert_unknown_test_slide_leaves_no_output(tmp_path):
    # a tiny MOB-like folder written here, so this check runs without ../shared too
    from test_io import make_mob

    make_mob(tmp_path / "mob")
    out = tmp_path / "o.h5"
    r = run_cli("convert", tmp_path / "mob", out, "--test", "NOPE")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: {tmp_path / 'mob'}: --test slide 'NOPE' not found; slides are "
                                "['M1', 'M2', 'M3']")
    assert not out.exists()
