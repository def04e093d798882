"""load_omics (npy folder, CSV, TSV) and OmicsTransform (fitted on training cases only, exact JSON round-trip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from momkd.data.omics import OmicsTable, OmicsTransform, load_omics
from momkd.errors import OmicsError


def table(values: np.ndarray, cases: list[str] | None = None) -> OmicsTable:
    values = np.asarray(values, dtype=np.float32)
    return OmicsTable(cases or [f"c{i}" for i in range(len(values))], [f"G{j}" for j in range(values.shape[1])], values)


def write_matrix(path: Path, rows: list[list[object]], delimiter: str = ",") -> Path:
    path.write_text("\n".join(delimiter.join(str(v) for v in row) for row in rows) + "\n")
    return path


MATRIX = [["case_id", "ERBB2", "GRB7", "ESR1"], ["A", 10, 0, 3.5], ["B", 1, 2, 0], ["C", 7, 7, 7]]


def test_npy_folder(tmp_path: Path) -> None:
    for case, v in {"TCGA-2": [1, 2, 3], "TCGA-1": [4.5, 5, 6]}.items():
        np.save(tmp_path / f"{case}.npy", np.array(v))
    (tmp_path / "notes.txt").write_text("ignored")
    t = load_omics(tmp_path)
    assert t.case_ids == ["TCGA-1", "TCGA-2"] and t.genes == ["g0", "g1", "g2"]
    assert t.values.dtype == np.float32
    np.testing.assert_array_equal(t.values, [[4.5, 5, 6], [1, 2, 3]])
    np.testing.assert_array_equal(t.rows(["TCGA-2"]), [[1, 2, 3]])


@pytest.mark.parametrize("name, bad, message", [
    ("short", np.ones(2), "short.npy: 2 values, but a.npy has 3"),
    ("matrix", np.ones((1, 3)), "matrix.npy: float64 array of shape (1, 3), expected a 1-D numeric vector"),
    ("nan", np.array([1.0, np.nan, 2.0]), "nan.npy: 1 NaN, Inf or out-of-range value(s) (first at index 1)"),
])
def test_npy_folder_errors_name_the_file(tmp_path: Path, name: str, bad: np.ndarray, message: str) -> None:
    np.save(tmp_path / "a.npy", np.ones(3))
    np.save(tmp_path / f"{name}.npy", bad)
    with pytest.raises(OmicsError) as info:
        load_omics(tmp_path)
    assert message in str(info.value)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t"), (".txt", "\t"), (".txt", ",")])
def test_matrix_formats(tmp_path: Path, suffix: str, delimiter: str) -> None:
    t = load_omics(write_matrix(tmp_path / f"omics{suffix}", MATRIX, delimiter))
    assert t.case_ids == ["A", "B", "C"] and t.genes == ["ERBB2", "GRB7", "ESR1"]
    np.testing.assert_array_equal(t.values, [[10, 0, 3.5], [1, 2, 0], [7, 7, 7]])
    assert "A" in t and "Z" not in t


def test_case_id_column_anywhere(tmp_path: Path) -> None:
    rows = [[r[1], r[0], r[2], r[3]] for r in MATRIX]
    t = load_omics(write_matrix(tmp_path / "o.csv", rows))
    assert t.case_ids == ["A", "B", "C"] and t.genes == ["ERBB2", "GRB7", "ESR1"]
    np.testing.assert_array_equal(t.values[:, 0], [10, 1, 7])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m[2].__setitem__(2, "abc"), "line 3, column GRB7: non-numeric value 'abc'"),
    (lambda m: m[3].__setitem__(1, ""), "line 4, column ERBB2: non-numeric value ''"),
    (lambda m: m[1].__setitem__(3, "nan"), "line 2, column ESR1: 'nan' is NaN, Inf or out of range"),
    (lambda m: m[3].__setitem__(0, "A"), "line 4: duplicate case A (first at line 2)"),
    (lambda m: m[0].__setitem__(0, "patient"), "no case_id column"),
    (lambda m: m[0].__setitem__(2, "ERBB2"), "gene column 'ERBB2' appears twice"),
    (lambda m: m[2].append(5), "line 3 has 5 fields, the header has 4"),
])
def test_matrix_errors(tmp_path: Path, edit, message: str) -> None:
    rows = [list(r) for r in MATRIX]
    edit(rows)
    path = write_matrix(tmp_path / "omics.csv", rows)
    with pytest.raises(OmicsError) as info:
        load_omics(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(OmicsError, match="not found"):
        load_omics(tmp_path / "nope.csv")
    with pytest.raises(OmicsError, match="no .npy files"):
        load_omics(tmp_path)


def test_top_variance_selection_ties_by_gene_order_and_zscore() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 50, size=(20, 6)).astype(np.float32)
    raw[:, 1] = raw[:, 4] = np.repeat([0.0, 1000.0], 10)   # equal, highest variance
    raw[:, 2] = 5.0                                         # constant
    tr = OmicsTransform(n_genes=3).fit(table(raw), [f"c{i}" for i in range(20)])
    logged = np.log2(raw.astype(np.float64) + 1)
    var = logged.var(axis=0)
    third = max((j for j in (0, 3, 5)), key=lambda j: (var[j], -j))
    assert tr.selected == [f"G{j}" for j in sorted([1, 4, third])]
    x = tr.transform(table(raw), [f"c{i}" for i in range(20)])
    assert x.dtype == np.float32 and x.shape == (20, 3)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-5)
    all_genes = OmicsTransform(n_genes=768).fit(table(raw), ["c0", "c1", "c2"])
    assert all_genes.selected == [f"G{j}" for j in range(6)] and all_genes.std[2] == 1e-6


def test_fit_on_train_only() -> None:
    """Changing the test cases' values (even wildly) changes nothing fitted nor any training vector."""
    rng = np.random.default_rng(1)
    raw = rng.gamma(2.0, 50.0, size=(30, 40)).astype(np.float32)
    train, test = [f"c{i}" for i in range(20)], [f"c{i}" for i in range(20, 30)]
    a = OmicsTransform(n_genes=10).fit(table(raw), train)
    poisoned = raw.copy()
    poisoned[20:] = rng.gamma(2.0, 5000.0, size=(10, 40))
    poisoned[20:, :5] = 0.0
    b = OmicsTransform(n_genes=10).fit(table(poisoned), train)
    assert a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(a.transform(table(raw), train), b.transform(table(poisoned), train))
    fitted_on_all = OmicsTransform(n_genes=10).fit(table(poisoned), train + test)
    assert fitted_on_all.to_dict() != a.to_dict()


def test_user_gene_list() -> None:
    t = table(np.arange(12).reshape(4, 3))
    tr = OmicsTransform(genes=["G2", "G0"]).fit(t, ["c0", "c1", "c2"])
    assert tr.selected == ["G2", "G0"] and tr.n_features == 2
    with pytest.raises(OmicsError, match="1 gene\\(s\\) of the gene list not in the omics table: ERBB2"):
        OmicsTransform(genes=["G0", "ERBB2"]).fit(t, ["c0"])
    with pytest.raises(OmicsError, match="repeats gene"):
        OmicsTransform(genes=["G0", "G0"]).fit(t, ["c0"])


def test_negative_values_refused_with_log2() -> None:
    t = table([[1.0, -0.5], [2.0, 3.0]])
    with pytest.raises(OmicsError, match="negative value -0.5 \\(case c0, gene G1\\).*--no-log2"):
        OmicsTransform().fit(t, ["c0", "c1"])
    x = OmicsTransform(log2=False).fit(t, ["c0", "c1"]).transform(t, ["c1", "c0"])
    np.testing.assert_allclose(x, [[1, 1], [-1, -1]])


def test_unknown_case_and_unfitted() -> None:
    t = table(np.ones((2, 2)))
    with pytest.raises(OmicsError, match="no omics for 1 case\\(s\\): zz"):
        OmicsTransform().fit(t, ["c0", "zz"])
    with pytest.raises(OmicsError, match="not fitted"):
        OmicsTransform().transform(t, ["c0"])


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    t = table(rng.gamma(1.5, 30.0, size=(25, 50)))
    tr = OmicsTransform(n_genes=17).fit(t, t.case_ids[:18])
    tr.save(tmp_path / "omics_transform.json")
    back = OmicsTransform.load(tmp_path / "omics_transform.json")
    assert back.to_dict() == tr.to_dict()
    np.testing.assert_array_equal(back.mean, tr.mean)
    np.testing.assert_array_equal(back.std, tr.std)
    np.testing.assert_array_equal(back.transform(t, t.case_ids), tr.transform(t, t.case_ids))
    assert OmicsTransform.from_dict(json.loads(json.dumps(tr.to_dict()))).selected == tr.selected


def test_load_rejects_bad_json(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(OmicsError, match="cannot read the omics transform"):
        OmicsTransform.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "momkd.omics_transform", "version": 1, "log2": True}))
    with pytest.raises(OmicsError, match="malformed omics transform"):
        OmicsTransform.load(tmp_path / "b.json")
