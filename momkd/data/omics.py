"""Paired omics: loading (``.npy`` folder or CSV/TSV matrix) and the per-fold transform.

``OmicsTransform`` turns raw expression into model input: log2(x + 1) (optional), gene selection (the top-N
genes by variance, or a user list) and z-scoring. Selection and scaling are fitted on the training cases of
a fold only, so validation and test cases never influence them; the fitted transform is saved as JSON.

``OmicsTransform.check`` is the one check of whether a transform can be fitted on a set of cases (negative values
under log2, an unknown gene list, genes constant across the cases): ``momkd validate`` applies it to the whole
cohort before training, and ``fit`` applies it to each fold's training cases.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.cohort import preview, read_table
from momkd.errors import OmicsError

STD_FLOOR = 1e-6
_FORMAT = "momkd.omics_transform"
_VERSION = 1


@dataclass(frozen=True, eq=False)
class OmicsTable:
    """Raw omics per case.

    Attributes:
        case_ids: C unique case ids (row order).
        genes: G unique gene names (column order).
        values: (C, G) float32, all finite.
        source: where the table came from (used in error messages).
    """

    case_ids: list[str]
    genes: list[str]
    values: np.ndarray
    source: str = "omics"
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.case_ids), len(self.genes)):
            raise ValueError(f"values have shape {self.values.shape}, "
                             f"expected ({len(self.case_ids)}, {len(self.genes)})")
        object.__setattr__(self, "_row", {c: i for i, c in enumerate(self.case_ids)})

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._row

    def rows(self, case_ids: Sequence[str]) -> np.ndarray:
        """(len(case_ids), G) float32 raw values of these cases, in the given order."""
        missing = [c for c in case_ids if c not in self._row]
        if missing:
            raise OmicsError(f"{self.source}: no omics for {len(missing)} case(s): {preview(missing)}")
        return self.values[[self._row[c] for c in case_ids]]


def load_omics(path: str | os.PathLike[str]) -> OmicsTable:
    """Load omics from a folder of per-case ``.npy`` vectors or a CSV/TSV matrix.

    Folder: every ``*.npy`` is one case (file stem = case id), a 1-D numeric vector; all vectors have the same
    length G and genes are named ``g0`` .. ``g{G-1}``. Matrix: a ``case_id`` column and one numeric column per
    gene (delimiter from the extension, ``.tsv`` tab, ``.csv`` comma, otherwise sniffed).

    Raises:
        OmicsError: one line naming the file and the problem (unreadable, wrong shape or length, non-numeric
            value with its line and column, duplicate case or gene, NaN/Inf).
    """
    path = Path(path)
    if path.is_dir():
        return _load_npy_folder(path)
    if not path.is_file():
        raise OmicsError(f"{path}: not found")
    return _load_matrix(path)


def _load_npy_folder(folder: Path) -> OmicsTable:
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise OmicsError(f"{folder}: no .npy files in the omics folder")
    vectors: list[np.ndarray] = []
    for f in files:
        try:
            v = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise OmicsError(f"{f}: cannot read the .npy file ({' '.join(str(e).split())})") from None
        if v.ndim != 1 or not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
            raise OmicsError(f"{f}: {v.dtype} array of shape {v.shape}, expected a 1-D numeric vector")
        if vectors and len(v) != len(vectors[0]):
            raise OmicsError(f"{f}: {len(v)} values, but {files[0].name} has {len(vectors[0])}")
        with np.errstate(over="ignore"):
            bad = np.flatnonzero(~np.isfinite(v.astype(np.float32)))
        if bad.size:
            raise OmicsError(f"{f}: {bad.size} NaN, Inf or out-of-range value(s) (first at index {bad[0]})")
        vectors.append(v)
    if len(vectors[0]) == 0:
        raise OmicsError(f"{files[0]}: empty vector")
    values = np.stack(vectors).astype(np.float32)
    return OmicsTable([f.stem for f in files], [f"g{j}" for j in range(values.shape[1])], values, str(folder))


def _load_matrix(path: Path) -> OmicsTable:
    table = read_table(path, OmicsError)
    if "case_id" not in table.header:
        raise OmicsError(f"{path}: no case_id column (columns: {preview(table.header, 8)})")
    i_case = table.header.index("case_id")
    gene_cols = [j for j in range(len(table.header)) if j != i_case]
    genes = [table.header[j] for j in gene_cols]
    if not genes:
        raise OmicsError(f"{path}: no gene columns besides case_id")
    seen_gene: dict[str, int] = {}
    for j, gene in zip(gene_cols, genes):
        if not gene:
            raise OmicsError(f"{path}: column {j + 1} has no name")
        if gene in seen_gene:
            raise OmicsError(f"{path}: gene column {gene!r} appears twice (columns {seen_gene[gene] + 1} and {j + 1})")
        seen_gene[gene] = j
    if not table.rows:
        raise OmicsError(f"{path}: no data rows")

    first_line: dict[str, int] = {}
    values = np.empty((len(table.rows), len(genes)), dtype=np.float32)
    for r, (line, cells) in enumerate(table.rows):
        case = cells[i_case]
        if not case:
            raise OmicsError(f"{path}: line {line}: empty case_id")
        if case in first_line:
            raise OmicsError(f"{path}: line {line}: duplicate case {case} (first at line {first_line[case]})")
        first_line[case] = line
        raw = [cells[j] for j in gene_cols]
        try:
            row = np.array(raw, dtype=np.float64)
        except ValueError:
            j = next(j for j, v in enumerate(raw) if not _is_number(v))
            raise OmicsError(f"{path}: line {line}, column {genes[j]}: non-numeric value {raw[j]!r}") from None
        with np.errstate(over="ignore"):
            values[r] = row
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        r, j = bad[0]
        raise OmicsError(f"{path}: line {table.rows[r][0]}, column {genes[j]}: {table.rows[r][1][gene_cols[j]]!r} "
                         f"is NaN, Inf or out of range ({len(bad)} such value(s) in all)")
    return OmicsTable(list(first_line), genes, values, str(path))


@dataclass(frozen=True)
class OmicsCheck:
    """What fitting an ``OmicsTransform`` on a set of cases meets (one line each, naming the omics source).

    Attributes:
        problems: reasons it cannot be fitted (``fit`` raises them): negative values under log2, genes of the
            gene list missing or repeated, cases without omics, every gene constant.
        warnings: it can, but some genes are constant across the cases (count and first names): they carry no
            signal, and z-scoring floors their std at 1e-6.
        constant_genes: names of those genes, in table order.
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    constant_genes: list[str] = field(default_factory=list)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class OmicsTransform:
    """log2(x + 1) -> gene selection -> z-score, fitted on one set of cases (a fold's training cases).

    Args:
        log2: apply log2(x + 1) to raw values (they must be non-negative); off for data already logged.
        n_genes: keep the ``n_genes`` genes of highest variance (of the log2 values, over the fitting cases;
            ties by table order); all genes when the table has fewer.
        genes: keep exactly these genes, in this order, instead of selecting by variance.
        raw: the identity (every gene in table order, as stored: no log2, selection or z-score), which is what
            the authors' code feeds the model (their per-case ``.npy`` vector); excludes ``log2`` and ``genes``.

    After ``fit``: ``selected`` (gene names, table order for variance selection), ``mean`` and ``std``
    (float64, one per selected gene, std floored at 1e-6).
    """

    def __init__(self, log2: bool = True, n_genes: int = 768, genes: Sequence[str] | None = None,
                 raw: bool = False) -> None:
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        if raw and (log2 or genes is not None):
            raise ValueError("raw omics input takes every gene as stored: it excludes log2 and a gene list")
        self.raw = bool(raw)
        self.log2 = bool(log2)
        self.n_genes = int(n_genes)
        self.genes = list(genes) if genes is not None else None
        self.selected: list[str] | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.n_fit_cases = 0
        self.warnings: list[str] = []   # the fitting cases' OmicsCheck warnings (constant genes), after ``fit``

    @property
    def fitted(self) -> bool:
        return self.selected is not None

    @property
    def n_features(self) -> int:
        """Length of each transformed vector (the model's omics input size)."""
        selected, _, _ = self._require_fitted()
        return len(selected)

    def check(self, table: OmicsTable, case_ids: Sequence[str]) -> OmicsCheck:
        """Every problem fitting this transform on ``case_ids`` meets, and a warning for genes constant across
        them (the genes it would choose from: the gene list, else all). ``fit`` refuses on exactly these
        problems, so a cohort that passes ``momkd validate`` with the same settings trains."""
        return self._inspect(table, case_ids)[0]

    def _inspect(self, table: OmicsTable, case_ids: Sequence[str]
                 ) -> tuple[OmicsCheck, np.ndarray | None, np.ndarray | None]:
        """``check``, and the prepared (len(case_ids), G') values with their G' table columns (None, None when a
        problem stops before them)."""
        if len(case_ids) == 0:
            return OmicsCheck([f"{table.source}: cannot fit the omics transform on zero cases"]), None, None
        try:
            columns = (self._columns(table, self.genes, "gene list") if self.genes is not None
                       else np.arange(len(table.genes)))
            x = table.rows(case_ids)[:, columns].astype(np.float64)
        except OmicsError as e:
            return OmicsCheck([str(e)]), None, None
        if self.log2:
            negative = self._negative(table, case_ids, columns, x)
            if negative is not None:
                return OmicsCheck([negative]), None, None
            x = np.log2(x + 1.0)
        if len(case_ids) < 2:   # one case: every gene is trivially constant
            return OmicsCheck(), x, columns
        constant = [table.genes[j] for j in columns[np.ptp(x, axis=0) == 0]]
        where = f"{table.source}: {len(constant)} of {len(columns)} gene(s)"
        if len(constant) == len(columns):
            return OmicsCheck([f"{where} (all) are constant across the {len(case_ids)} cases: the omics carry no "
                               "signal"], constant_genes=constant), x, columns
        warnings = [f"{where} are constant across the {len(case_ids)} cases and carry no signal: "
                    f"{preview(constant)}"] if constant else []
        return OmicsCheck(warnings=warnings, constant_genes=constant), x, columns

    def fit(self, table: OmicsTable, case_ids: Sequence[str]) -> OmicsTransform:
        """Fit selection and scaling on ``case_ids`` only (no other row of ``table`` is looked at).

        Raises ``OmicsError`` with ``check``'s problems; its warnings are kept in ``warnings``."""
        checked, x, columns = self._inspect(table, case_ids)
        if checked.problems or x is None or columns is None:
            raise OmicsError("; ".join(checked.problems))
        self.n_fit_cases = len(case_ids)
        self.warnings = list(checked.warnings)
        if self.raw:   # the identity: every gene as stored, mean 0, std 1
            self.selected = list(table.genes)
            self.mean, self.std = np.zeros(len(table.genes)), np.ones(len(table.genes))
            return self
        if self.genes is None:
            top = np.argsort(-x.var(axis=0), kind="stable")[: self.n_genes]
            columns = np.sort(top)
            x = x[:, columns]
        self.selected = [table.genes[j] for j in columns]
        self.mean = x.mean(axis=0)
        self.std = np.maximum(x.std(axis=0), STD_FLOOR)
        return self

    def transform(self, table: OmicsTable, case_ids: Sequence[str]) -> np.ndarray:
        """(len(case_ids), n_features) float32 model input for these cases (rows in the given order)."""
        selected, mean, std = self._require_fitted()
        x = self._prepare(table, case_ids, self._columns(table, selected, "fitted transform"))
        return ((x - mean) / std).astype(np.float32)

    def _prepare(self, table: OmicsTable, case_ids: Sequence[str], columns: np.ndarray) -> np.ndarray:
        """Raw values of these cases and columns as float64, log2(x + 1)-transformed when ``log2``."""
        x = table.rows(case_ids)[:, columns].astype(np.float64)
        if not self.log2:
            return x
        negative = self._negative(table, case_ids, columns, x)
        if negative is not None:
            raise OmicsError(negative)
        return np.log2(x + 1.0)

    @staticmethod
    def _negative(table: OmicsTable, case_ids: Sequence[str], columns: np.ndarray, x: np.ndarray) -> str | None:
        """The problem of raw values ``x`` (len(case_ids), len(columns)) that log2(x + 1) cannot take, if any."""
        negative = np.argwhere(x < 0)
        if not negative.size:
            return None
        r, j = negative[0]
        return (f"{table.source}: negative value {x[r, j]:g} (case {case_ids[r]}, gene {table.genes[columns[j]]}) "
                f"cannot be log2(x+1)-transformed ({len(negative)} negative value(s) in all); use --no-log2 if the "
                "values are already log-scaled")

    @staticmethod
    def _columns(table: OmicsTable, genes: Sequence[str], what: str) -> np.ndarray:
        index = {g: j for j, g in enumerate(table.genes)}
        unknown = [g for g in genes if g not in index]
        if unknown:
            raise OmicsError(f"{table.source}: {len(unknown)} gene(s) of the {what} not in the omics table: "
                             f"{preview(unknown)}")
        repeated = sorted(g for g, n in Counter(genes).items() if n > 1)
        if repeated:
            raise OmicsError(f"the {what} repeats gene(s) {preview(repeated)}")
        return np.array([index[g] for g in genes], dtype=np.int64)

    def _require_fitted(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The fitted (selected, mean, std); OmicsError when the transform is not fitted."""
        if self.selected is None or self.mean is None or self.std is None:
            raise OmicsError("the omics transform is not fitted")
        return self.selected, self.mean, self.std

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state; floats are written exactly (float64 repr round-trips)."""
        selected, mean, std = self._require_fitted()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "log2": self.log2,
            "raw": self.raw,
            "n_genes": self.n_genes,
            "genes": self.genes,
            "selected": selected,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "n_fit_cases": self.n_fit_cases,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmicsTransform:
        """Rebuild a fitted transform from ``to_dict()``'s output."""
        try:
            if data.get("format") != _FORMAT or data.get("version") != _VERSION:
                raise OmicsError(f"not a momkd omics transform (format {data.get('format')!r}, "
                                 f"version {data.get('version')!r})")
            out = cls(log2=data["log2"], n_genes=data["n_genes"], genes=data["genes"], raw=data.get("raw", False))
            out.selected = [str(g) for g in data["selected"]]
            out.mean = np.array(data["mean"], dtype=np.float64)
            out.std = np.array(data["std"], dtype=np.float64)
            out.n_fit_cases = int(data["n_fit_cases"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OmicsError(f"malformed omics transform: {type(e).__name__}: {e}") from None
        if not (len(out.selected) == len(out.mean) == len(out.std)) or not len(out.selected):
            raise OmicsError("malformed omics transform: selected/mean/std lengths differ or are zero")
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_dict()`` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OmicsTransform:
        """Read a transform written by ``save``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise OmicsError(f"{path}: cannot read the omics transform ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise OmicsError(f"{path}: not a momkd omics transform")
        try:
            return cls.from_dict(data)
        except OmicsError as e:
            raise OmicsError(f"{path}: {e}") from None
