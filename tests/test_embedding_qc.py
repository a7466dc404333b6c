"""Embedding QC on synthetic features: slide separation, shuffled labels, the figure, determinism, fallbacks."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from hevisum.errors import HevisumError
from hevisum.report.embedding import embedding_qc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_slides(n: int = 300, f: int = 20, offset: float = 4.0, seed: int = 0):
    """Two "slides" of Gaussian features, the second shifted by ``offset`` along every column; groups shuffled
    independently of the slides; hostile label names."""
    rng = np.random.default_rng(seed)
    slides = np.repeat(np.array(["$x^$", "<b>"]), n // 2)
    x = rng.normal(size=(n, f))
    x[slides == "<b>"] += offset
    groups = rng.permutation(np.repeat(np.array(["_g1", "g$2"]), n // 2))
    dominant = rng.choice(np.array(["T cells", "$\\alpha$", "_hidden"]), n)
    return x, slides, groups, dominant


def test_slide_offset_separates_and_shuffled_labels_do_not(tmp_path):
    x, slides, groups, dominant = two_slides()
    out = tmp_path / "qc" / "embedding.png"
    qc = embedding_qc(x, slides, groups, dominant, seed=0, out=out)
    print(f"silhouette by slide {qc.silhouette['slide']:.3f}, by shuffled group {qc.silhouette['group']:.3f}")
    assert qc.silhouette["slide"] > 0.5
    assert abs(qc.silhouette["group"]) < 0.05
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(out.parent.glob("*.tmp"))
    assert qc.umap is not None and qc.umap.shape == (len(x), 2) and qc.pca.shape == (len(x), 2)
    assert qc.metrics["umap"] is True and qc.metrics["n_slides"] == 2
    json.dumps(qc.metrics)  # JSON-safe for metrics.json

    again = embedding_qc(x, slides, groups, dominant, seed=0)
    np.testing.assert_array_equal(again.pca, qc.pca)
    np.testing.assert_array_equal(again.umap, qc.umap)
    assert again.metrics == qc.metrics


def test_sampling_and_missing_labels():
    x, slides, _, _ = two_slides(n=400, offset=0.0)
    a = embedding_qc(x, slides, seed=3, max_points=120, use_umap=False)
    b = embedding_qc(x, slides, seed=3, max_points=120, use_umap=False)
    assert a.rows.shape == (120,) and np.all(np.diff(a.rows) > 0)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.pca, b.pca)
    assert a.umap is None and a.silhouette["group"] is None and a.metrics["silhouette_group"] is None
    assert abs(a.silhouette["slide"]) < 0.05  # no offset: slides mix
    one = embedding_qc(x, np.zeros(len(x)), use_umap=False)
    assert one.silhouette["slide"] is None
    with pytest.raises(HevisumError):
        embedding_qc(x, slides[:-1])
    with pytest.raises(HevisumError):
        embedding_qc(np.full((10, 3), np.nan), np.arange(10) % 2)


def test_pca_only_when_umap_cannot_be_imported(tmp_path, monkeypatch, caplog):
    x, slides, groups, dominant = two_slides(n=120)
    monkeypatch.setitem(sys.modules, "umap", None)  # makes "import umap" fail, as when it is not installed
    with caplog.at_level(logging.WARNING, logger="hevisum.report.embedding"):
        qc = embedding_qc(x, slides, groups, dominant, out=tmp_path / "pca.png")
    assert qc.umap is None and qc.metrics["umap"] is False and "umap" in qc.umap_error
    assert any("PCA only" in r.getMessage() for r in caplog.records)
    assert qc.silhouette["slide"] > 0.5
    assert (tmp_path / "pca.png").read_bytes()[:8] == PNG_MAGIC
