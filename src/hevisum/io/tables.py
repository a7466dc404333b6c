"""Shared reader helpers: TSV/CSV tables, joining targets to spots by key, gene-count targets, test split.

Gene-count targets are resolved in two steps so that several sections (or several inputs) choose the
same genes: a reader returns :class:`LoadedSlide` objects carrying the raw counts, and
:func:`resolve_gene_targets` normalises every slide as ``log1p(counts / total * 1e4)`` and keeps the
``top_genes`` genes of highest variance over all those slides' spots together.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hevisum.errors import HevisumError
from hevisum.slide import Slide

TABLE_SUFFIXES = (".tsv", ".csv", ".txt", ".tsv.gz", ".csv.gz", ".txt.gz")
COUNTS_SCALE = 1e4  # counts per 10k: the usual library-size normalisation


# ---------------------------------------------------------------------------------------------- tables
def is_table_file(p: Path) -> bool:
    """True when the file name ends with a TSV/CSV/TXT suffix (optionally gzipped)."""
    name = p.name.lower()
    return any(name.endswith(s) for s in TABLE_SUFFIXES)


def read_table(path: str | Path, what: str, *, index_col: int | None = 0, header: int | None = 0) -> pd.DataFrame:
    """Read a TSV/CSV (optionally ``.gz``) into a DataFrame; the separator is taken from the first line.

    ``what`` says what the table is for ("targets table", "spot table"...) in error messages.
    """
    p = Path(path)
    if not p.is_file():
        raise HevisumError(f"{what} {str(p)!r} not found")
    sep = _sniff_sep(p)
    try:
        # round_trip: parse decimals exactly as written (the fast parser may differ in the last bit);
        # low_memory=False parses in one pass, much faster on wide count tables (15k+ gene columns).
        df = pd.read_csv(p, sep=sep, index_col=index_col, header=header, float_precision="round_trip",
                         low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as e:
        raise HevisumError(f"{p}: cannot read {what} as {'TSV' if sep == chr(9) else 'CSV'} ({e})") from None
    except pd.errors.EmptyDataError:
        raise HevisumError(f"{p}: {what} is empty") from None
    if df.shape[0] == 0:
        raise HevisumError(f"{p}: {what} has no rows")
    return df


def show_value(v) -> str:
    """A value read from a file, for a message: numbers as plain numbers (``nan``, ``2``), text quoted."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return repr(v.item() if isinstance(v, np.generic) else v)


def _sniff_sep(p: Path) -> str:
    import gzip

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rt", errors="replace") as fh:
            first = fh.readline()
    except (OSError, EOFError) as e:
        raise HevisumError(f"{p}: cannot read file ({e})") from None
    if "\t" in first:
        return "\t"
    if "," in first:
        return ","
    return "\t" if ".tsv" in p.name.lower() else ","


def require_columns(df: pd.DataFrame, columns: Sequence[str], where: str | Path, expected: str = "") -> None:
    """Raise naming the file, the missing column(s) and the columns found."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        found = [str(c) for c in df.columns]
        shown = found[:12] + (["..."] if len(found) > 12 else [])
        raise HevisumError(
            f"{where}: missing column(s) {missing}; columns found: {shown}"
            + (f"; expected {expected}" if expected else "")
        )


def numeric_matrix(df: pd.DataFrame, where: str | Path) -> np.ndarray:
    """The table's values as float64; raise naming the first non-numeric column."""
    bad = [c for c, dt in df.dtypes.items() if not pd.api.types.is_numeric_dtype(dt)]
    if bad:
        col = bad[0]
        example = df[col].dropna().astype(str).iloc[0] if df[col].notna().any() else "?"
        raise HevisumError(
            f"{where}: column {str(col)!r} is not numeric (e.g. {example!r}); target tables hold one row per spot "
            "(first column = spot key) and one numeric column per target"
        )
    return df.to_numpy(dtype=np.float64)


def looks_like_counts(values: np.ndarray | sp.spmatrix) -> bool:
    """True when every value is a non-negative integer (raw UMI counts), and not all are 0/1."""
    data = values.data if sp.issparse(values) else np.asarray(values)
    if data.size == 0:
        return False
    if not np.issubdtype(data.dtype, np.number):
        return False
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            return False
    return bool(data.min() >= 0 and data.max() > 1)


# ------------------------------------------------------------------------------------- keyed joins
@dataclass
class KeyedTargets:
    """Targets (or counts) matched to spots: ``order`` indexes the spot table, ``rows`` the target table."""

    order: np.ndarray
    rows: np.ndarray
    n_spots_dropped: int
    n_rows_unmatched: int


def match_keys(spot_keys: Sequence[str], table_keys: Sequence[str], table_where: str, spot_where: str,
               key_name: str) -> KeyedTargets:
    """Match spots to target rows by key, in the order of the target table.

    Spots without a row are dropped (counted); rows without a spot are ignored (counted). When nothing
    matches, raise naming both sides with an example key of each (the usual cause: a '-1' suffix or
    '{x}x{y}' built from other columns).
    """
    spot_keys = [str(k) for k in spot_keys]
    table_keys = [str(k) for k in table_keys]
    dup = pd.Index(table_keys)[pd.Index(table_keys).duplicated()]
    if len(dup):
        raise HevisumError(f"{table_where}: duplicate {key_name} {dup[0]!r}; each spot needs exactly one row")
    pos = {k: i for i, k in enumerate(spot_keys)}
    rows, order = [], []
    for r, k in enumerate(table_keys):
        i = pos.get(k)
        if i is not None:
            rows.append(r)
            order.append(i)
    if not rows:
        raise HevisumError(
            f"{table_where}: no {key_name} matches the spots of {spot_where} "
            f"(table has e.g. {table_keys[0]!r}, spots have e.g. {spot_keys[0]!r}); "
            f"the table's first column must hold the spots' {key_name}s"
        )
    return KeyedTargets(order=np.asarray(order, dtype=np.int64), rows=np.asarray(rows, dtype=np.int64),
                        n_spots_dropped=len(spot_keys) - len(rows), n_rows_unmatched=len(table_keys) - len(rows))


# ------------------------------------------------------------------------------------ gene counts
@dataclass
class GeneCounts:
    """Raw counts of one slide, rows in the order of the slide's spots."""

    counts: sp.csr_matrix
    genes: list[str]
    source: str = ""
    highly_variable: list[str] | None = None  # genes the input marks (AnnData var["highly_variable"])


@dataclass
class LoadedSlide:
    """A slide as read, before gene-count targets are resolved (``counts`` is None for other targets)."""

    slide: Slide
    counts: GeneCounts | None = None


def to_csr_counts(values: np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    """Counts as a float64 CSR matrix (spots x genes)."""
    m = sp.csr_matrix(values, dtype=np.float64)
    m.eliminate_zeros()
    return m


def normalize_counts(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """``log1p(counts / total * 1e4)`` per spot (row); a spot with no counts stays all zero.

    The total is over every gene of the row (before any gene selection), as in the usual library-size
    normalisation. Works on sparse or dense input; returns CSR float64 (log1p keeps zeros at zero).
    """
    m = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(COUNTS_SCALE, totals, out=np.zeros_like(totals), where=totals > 0)
    m = sp.diags(scale) @ m
    m = sp.csr_matrix(m)
    np.log1p(m.data, out=m.data)
    return m


def gene_variances(matrices: Sequence[sp.spmatrix], chunk: int = 1024) -> np.ndarray:
    """Population variance of every column over the rows of all matrices stacked (same columns).

    Computed on dense column chunks with numpy's two-pass ``var`` so near-ties order the same way as a
    dense computation would.
    """
    stacked = sp.vstack([sp.csr_matrix(m) for m in matrices], format="csc")
    n_genes = stacked.shape[1]
    out = np.empty(n_genes, dtype=np.float64)
    for start in range(0, n_genes, chunk):
        block = stacked[:, start:start + chunk].toarray()
        out[start:start + chunk] = block.var(axis=0)
    return out


def top_variable(variances: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest variances, largest first; ties keep column order."""
    return np.argsort(-variances, kind="stable")[: min(n, len(variances))]


def _union_genes(items: Sequence[GeneCounts]) -> list[str]:
    seen: dict[str, None] = {}
    for gc in items:
        for g in gc.genes:
            seen.setdefault(g, None)
    return list(seen)


def _align(gc: GeneCounts, index: dict[str, int], n: int) -> sp.csr_matrix:
    """Re-express a slide's matrix in the union gene order; genes it lacks are zero (not detected)."""
    cols = np.fromiter((index[g] for g in gc.genes), dtype=np.int64, count=len(gc.genes))
    m = sp.csr_matrix(gc.counts)
    mapped = sp.csr_matrix((m.data, cols[m.indices], m.indptr), shape=(m.shape[0], n))
    mapped.sort_indices()
    return mapped


def resolve_gene_targets(loaded: Sequence[LoadedSlide], top_genes: int = 50,
                         genes: Sequence[str] | None = None) -> list[Slide]:
    """Turn pending gene counts into targets, choosing the genes jointly over every slide with counts.

    Each slide is normalised on its own (``log1p(counts/total*1e4)`` with its own totals); the genes kept are
    the ``top_genes`` of highest variance over all spots of all those slides together (a gene missing from one
    slide's table counts as zero there), unless ``genes`` names them. Slides without counts pass through.
    Returns new Slide objects; the inputs are not modified.
    """
    if top_genes < 1:
        raise HevisumError(f"top_genes must be at least 1, got {top_genes}")
    pending = [ls for ls in loaded if ls.counts is not None]
    if not pending:
        return [ls.slide for ls in loaded]
    union = _union_genes([ls.counts for ls in pending])
    index = {g: i for i, g in enumerate(union)}
    first = set(pending[0].counts.genes)
    for ls in pending[1:]:
        if first.isdisjoint(ls.counts.genes):
            a, b = pending[0], ls
            raise HevisumError(
                f"gene names of slide {b.slide.slide_id!r} ({b.counts.source}, e.g. {b.counts.genes[0]!r}) share none "
                f"with slide {a.slide.slide_id!r} ({a.counts.source}, e.g. {a.counts.genes[0]!r}); inputs whose "
                "targets are gene counts must use the same gene naming (symbols or Ensembl ids)"
            )
    norm = [normalize_counts(_align(ls.counts, index, len(union))) for ls in pending]
    marked = [ls.counts.highly_variable for ls in pending if ls.counts.highly_variable]
    if genes is None and marked:
        # the input's own choice (scanpy's highly_variable_genes): the genes marked on every such slide
        genes = [g for g in marked[0] if all(g in set(m) for m in marked[1:])]
    if genes is not None:
        missing = [g for g in genes if g not in index]
        if missing:
            raise HevisumError(
                f"requested gene(s) {missing[:5]} not found in the counts of slides "
                f"{[ls.slide.slide_id for ls in pending]} ({len(union)} genes, e.g. {union[:3]})"
            )
        chosen = np.asarray([index[g] for g in genes], dtype=np.int64)
        how = f"{len(chosen)} genes given by name"
    else:
        variances = gene_variances(norm)
        chosen = top_variable(variances, top_genes)
        how = (f"top {len(chosen)} of {len(union)} genes by variance of log1p(counts/total*1e4) over "
               f"{sum(m.shape[0] for m in norm)} spots of {len(pending)} slide(s)")
    names = [union[i] for i in chosen]
    by_id = {id(ls): m for ls, m in zip(pending, norm)}
    out: list[Slide] = []
    for ls in loaded:
        if ls.counts is None:
            out.append(ls.slide)
            continue
        values = by_id[id(ls)][:, chosen].toarray()
        own = set(ls.counts.genes)
        absent = sum(1 for g in names if g not in own)
        meta = dict(ls.slide.meta)
        meta.update({"targets_kind": "genes", "gene_selection": how, "n_selected_genes_absent": absent})
        out.append(replace(ls.slide, targets=values, target_names=list(names), meta=meta))
    return out


# ------------------------------------------------------------------------------------- test split
def apply_test_split(slides: Sequence[Slide], test_slides: Sequence[str] | None, where: str = "") -> list[Slide]:
    """Mark named slides as Test (their targets move to ``meta['truth']``); slides without targets are Test too.

    Raises naming the unknown id and the valid ones when a name matches no slide. Returns new Slide objects.
    """
    ids = [s.slide_id for s in slides]
    for tid in test_slides or []:
        if tid not in ids:
            raise HevisumError(
                f"{where + ': ' if where else ''}--test slide {tid!r} not found; slides are {ids}"
            )
    wanted = set(test_slides or [])
    out = []
    for s in slides:
        if s.slide_id in wanted or s.targets is None:
            meta = dict(s.meta)
            if s.targets is not None:
                meta["truth"] = s.targets
                meta["truth_names"] = s.target_names
            out.append(replace(s, targets=None, split="test", meta=meta,
                               target_names=None if s.targets is not None else s.target_names))
        else:
            out.append(s)
    return out
