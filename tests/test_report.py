"""report.html is self-contained (every image a data: URI, nothing linked), names from the input are only ever
escaped, and one slide cut into cross-validation blocks is mapped as one stitched figure."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import hevisum
from hevisum.demo import DemoSpec, write_demo
from hevisum.names import safe_name

SCRIPT = "<script>alert(1)</script>"
# demo slide -> hostile id; the one training slide is cut into blocks ("a#b#block1".."a#b#block4")
HOSTILE = {"S_1": "a#b", "S_2": SCRIPT, "S_3": "../x", "S_4": "$x^$"}
FAST = {"models": {"methods": ["mean"]}, "stacking": {"enabled": False}}  # the baselines only


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    h5, _ = write_demo(tmp / "demo.h5", DemoSpec(n_train=4, n_test=1, n_spots=100, n_targets=6, seed=2),
                       progress=False)
    slides = hevisum.read(h5, test_slides=["S_2", "S_3", "S_4"])  # their targets become the test truth
    slides = [s for s in slides if s.slide_id in HOSTILE]  # S_5, a test slide without truth, left out
    for s in slides:
        s.slide_id = HOSTILE.get(s.slide_id, s.slide_id)
    result = hevisum.run(slides, tmp / "run", config=FAST, progress=False)
    return result.out


def test_every_image_is_embedded_and_nothing_is_linked(hostile_run):
    html = (hostile_run / "report.html").read_text()
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) >= 8
    for tag in imgs:
        src = re.search(r'\bsrc="([^"]*)"', tag)
        assert src and src.group(1).startswith("data:image/png;base64,"), tag[:120]
    assert len(re.findall(r"\bsrc=", html)) == len(imgs)  # no other sources (scripts, frames)
    assert all(h.startswith("#") for h in re.findall(r"""\bhref=['"]([^'"]*)""", html))  # in-page anchors only
    assert "<link" not in html and "url(" not in html and "@import" not in html


def test_hostile_slide_ids_appear_only_escaped(hostile_run):
    out = hostile_run
    html = (out / "report.html").read_text()
    assert SCRIPT not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # the page's own table sorter
    assert "$x^$" in html and "a#b" in html
    assert not re.search(r"""(?:src|href)=['"][^'"]*\.\./""", html)
    # every file the run wrote has a safe name, inside the run folder
    for p in out.rglob("*"):
        assert not set(p.relative_to(out).as_posix()) & set("<>#$^"), p
    for slide in HOSTILE.values():
        assert (out / "figures" / f"map_{safe_name(slide)}.png").is_file(), slide
    # the predictions keep the ids as data
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert set(HOSTILE.values()) <= set(pred.obs["slide"].astype(str))
    assert set(pred.obs["split"]) == {"test", "train_oof"}
    test_rows = pred.obs["slide"].isin([SCRIPT, "../x", "$x^$"]).to_numpy()
    assert np.isfinite(pred.layers["truth"][test_rows]).all()  # the test slides' truth, from the input


def test_single_slide_is_one_stitched_map_and_the_report_has_its_sections(hostile_run):
    out = hostile_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["folds"] == [f"a#b#block{k}" for k in range(1, 5)]
    maps = sorted(p.name for p in (out / "figures").glob("map_*.png"))
    assert len(maps) == 4 and not any("block" in m for m in maps)  # one per slide, none per block
    html = (out / "report.html").read_text()
    assert html.count('alt="Maps of slide a#b"') == 1
    # the warning (baselines only: nothing beats them), the per-target table, the embedding QC numbers
    assert "class=warn" in html and "no method beats the baselines" in html
    table = pd.read_csv(out / "per_target.csv")
    assert len(table) == 6 and table["cv_pearson"].is_monotonic_decreasing
    assert "class=sortable" in html
    qc = metrics["embedding_qc"]
    assert qc["n_slides"] == 4 and qc["silhouette_slide"] is not None
    assert "Realignment QC" in html and "Embedding QC" in html and "Files in the run folder" in html
