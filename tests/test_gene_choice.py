"""Which genes become targets: the most variable ones, an .h5ad's var["highly_variable"], or --genes FILE."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def _scanpy_like(path, hv: list[str] | None = None):
    import anndata as ad

    rng = np.random.default_rng(0)
    n, g = 30, 12
    counts = rng.poisson(rng.uniform(0.5, 9, g), size=(n, g)).astype(np.float32)
    var = pd.DataFrame(index=[f"gene{j}" for j in range(g)])
    if hv is not None:
        var["highly_variable"] = [name in hv for name in var.index]
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"bc{i}" for i in range(n)]), var=var)
    xy = np.column_stack([np.tile(np.arange(6), 5) * 40 + 60.0, np.repeat(np.arange(5), 6) * 40 + 60.0])
    adata.obsm["spatial"] = xy
    img = np.full((160, 160, 3), 0.8, dtype=np.float32)
    adata.uns["spatial"] = {"lib1": {"images": {"hires": img},
                                     "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 20.0}}}
    adata.write_h5ad(path)
    return path


def test_var_highly_variable_chooses_the_genes_in_its_order(tmp_path):
    from hevisum.io import read_inputs

    p = _scanpy_like(tmp_path / "hv.h5ad", hv=["gene7", "gene2", "gene9"])
    (s,) = read_inputs([str(p)], progress=False)
    assert s.target_names == ["gene2", "gene7", "gene9"]  # var order
    (plain,) = read_inputs([str(_scanpy_like(tmp_path / "plain.h5ad"))], top_genes=3, progress=False)
    assert len(plain.target_names) == 3


def test_genes_file_names_the_targets_and_bad_files_are_one_line(tmp_path, capsys):
    import h5py

    from hevisum.cli import main

    p = _scanpy_like(tmp_path / "a.h5ad", hv=["gene1"])
    genes = tmp_path / "genes.txt"
    genes.write_text("gene\ngene4\ngene0\n")
    out = tmp_path / "a.h5"
    assert main(["convert", str(p), str(out), "--genes", str(genes)]) == 0
    with h5py.File(out) as f:
        import json

        assert json.loads(f.attrs["target_names"]) == ["gene4", "gene0"]  # --genes wins over the marks
    genes.write_text("gene4\nnot_a_gene\n")
    assert main(["convert", str(p), str(tmp_path / "b.h5"), "--genes", str(genes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_a_gene" in err[0]
    assert main(["convert", str(p), str(tmp_path / "c.h5"), "--genes", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "gene\n", "gene1\ngene1\n"])
def test_an_empty_or_repeating_gene_list_is_refused(tmp_path, text):
    from hevisum.cli import _read_gene_list
    from hevisum.errors import HevisumError

    f = tmp_path / "g.txt"
    f.write_text(text)
    with pytest.raises(HevisumError, match="g.txt"):
        _read_gene_list(str(f))
