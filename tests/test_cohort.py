"""load_cohort (problems collected, not raised) and case-level stratified splits (make/save/load)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from momkd.data.cohort import (
    Cohort,
    Problem,
    load_cohort,
    load_splits,
    make_splits,
    min_cases_per_class,
    save_splits,
    slide_stem,
)
from momkd.errors import CohortError

HEADER = ["case_id", "slide_id", "HER2"]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def problems_of(path: Path, label_col: str = "HER2", positive: str = "pos") -> list[str]:
    found: list[Problem] = []
    load_cohort(path, label_col, positive, found)
    return [str(p) for p in found]


def test_load(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "cohort.csv", [
        ["P1", "P1-A.svs", "Pos"], ["P1", "P1-B.NDPI", "Pos"], ["P2", "P2-A.tiff", "neg"],
        ["P3", "P3.x.y.h5", " POS "], ["P4", "TCGA-X.B34C.svs", "neg"],
    ])
    cohort = load_cohort(path, "HER2", " pos")
    assert cohort.cases == ["P1", "P2", "P3", "P4"]
    assert cohort.labels == {"P1": 1, "P2": 0, "P3": 1, "P4": 0}
    assert cohort.slides == {"P1": ["P1-A", "P1-B"], "P2": ["P2-A"], "P3": ["P3.x.y"], "P4": ["TCGA-X.B34C"]}
    assert cohort.class_names == ("neg", "Pos") and cohort.label_col == "HER2" and cohort.positive == " pos"
    assert cohort.slide_ids == ["P1-A", "P1-B", "P2-A", "P3.x.y", "TCGA-X.B34C"]
    assert cohort.class_counts() == {"neg": 2, "Pos": 2}


def test_slide_stem() -> None:
    assert slide_stem("a.svs") == "a" and slide_stem("a.SVS") == "a" and slide_stem("a.b.mrxs") == "a.b"
    assert slide_stem("a.uuid") == "a.uuid" and slide_stem(".svs") == ".svs" and slide_stem(" b ") == "b"


@pytest.mark.parametrize("rows, header, expected", [
    ([["P1", "s1", "pos"], ["P1", "s2", "neg"], ["P2", "s3", "neg"]], HEADER,
     "cohort.csv line 3: case P1 has conflicting labels 'pos' (line 2) and 'neg'"),
    ([["P1", "s1", "pos"], ["P1", "s1.svs", "pos"], ["P2", "s3", "neg"]], HEADER,
     "cohort.csv line 3: duplicate row for case P1, slide s1 (first at line 2)"),
    ([["P1", "s1", "pos"], ["P2", "s1", "neg"]], HEADER,
     "cohort.csv line 3: slide s1 is listed under case P2 and under case P1 (line 2)"),
    ([["P1", "s1", "pos"], ["P2", "s2", "neg"], ["P3", "s3", "equivocal"]], HEADER,
     "unknown label value(s): column HER2 has 3 distinct values "
     "('pos' (1 rows), 'neg' (1 rows), 'equivocal' (1 rows))"),
    ([["P1", "s1", "yes"], ["P2", "s2", "no"]], HEADER, "positive value 'pos' does not occur in column HER2"),
    ([["P1", "s1", "pos"], ["P2", "s2", "POS"]], HEADER, "column HER2 has only the positive value"),
    ([["P1", "s1", "pos"], ["P2", "", "neg"], ["P3", "s3", "neg"]], HEADER, "cohort.csv line 3: empty slide_id"),
    ([["P1", "s1", "pos"]], ["case_id", "slide", "her2"],
     "missing column(s) slide_id, HER2 (columns: case_id, slide, her2)"),
    ([], HEADER, "no data rows"),
])
def test_problems(tmp_path: Path, rows: list[list[str]], header: list[str], expected: str) -> None:
    path = write_csv(tmp_path / "cohort.csv", rows, header)
    found = problems_of(path)
    assert len(found) == 1 and expected in found[0], found
    with pytest.raises(CohortError, match="1 problem\\(s\\) in the cohort table"):
        load_cohort(path, "HER2", "pos")


def test_every_problem_at_once(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "cohort.csv", [
        ["P1", "s1", "pos"], ["P1", "s2", "neg"], ["P2", "s3", "neg"], ["P2", "s3", "neg"], ["P3", "s3", "pos"],
    ])
    found = problems_of(path)
    assert len(found) == 3
    cohort = load_cohort(path, "HER2", "pos", [])
    assert cohort.cases == ["P2"]   # P1 conflicting, P3's only slide belongs to P2


def test_unreadable_table(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.csv") == [
        f"{tmp_path / 'nope.csv'}: cannot read the file: No such file or directory"]


def labelled(n_pos: int, n_neg: int) -> tuple[list[str], list[int]]:
    cases = [f"c{i:03d}" for i in range(n_pos + n_neg)]
    labels = [1] * n_pos + [0] * n_neg
    order = sorted(range(len(cases)), key=lambda i: (i * 7919) % len(cases))   # interleave the classes
    return [cases[i] for i in order], [labels[i] for i in order]


def test_splits_stratified_disjoint_and_complete() -> None:
    cases, labels = labelled(40, 60)
    y = dict(zip(cases, labels))
    splits = make_splits(cases, labels, folds=5, seed=0)
    assert [s.fold for s in splits] == list(range(5))
    tested = Counter(c for s in splits for c in s.test)
    assert set(tested) == set(cases) and set(tested.values()) == {1}
    for s in splits:
        parts = [set(s.train), set(s.val), set(s.test)]
        assert sum(map(len, parts)) == len(cases) and set.union(*parts) == set(cases)
        assert len(s.train) == 70 and len(s.val) == 10 and len(s.test) == 20     # 7:1:2
        for part in (s.train, s.val, s.test):
            assert abs(sum(y[c] for c in part) / len(part) - 0.4) <= 0.1           # stratified
        assert s.test == [c for c in cases if c in set(s.test)]                   # cohort order


def test_splits_small_classes_and_cohort_input(tmp_path: Path) -> None:
    cases, labels = labelled(5, 9)
    splits = make_splits(cases, dict(zip(cases, labels)), folds=5, seed=3)
    for s in splits:
        for part in (s.train, s.val, s.test):
            assert {labels[cases.index(c)] for c in part} == {0, 1}
    cohort = Cohort(cases, dict(zip(cases, labels)), {c: [c] for c in cases}, ("neg", "pos"), "y", "pos")
    assert make_splits(cohort, folds=5, seed=3) == splits


def test_splits_deterministic() -> None:
    cases, labels = labelled(20, 30)
    assert make_splits(cases, labels, seed=7) == make_splits(cases, labels, seed=7)
    assert make_splits(cases, labels, seed=7) != make_splits(cases, labels, seed=8)


def test_too_few_cases() -> None:
    assert [min_cases_per_class(k) for k in (2, 3, 5, 10)] == [4, 3, 5, 10]
    cases, labels = labelled(4, 30)
    with pytest.raises(CohortError,
                       match="the positive class has 4 case\\(s\\); 5-fold splits need at least 5 per class"):
        make_splits(cases, labels, folds=5)


def test_save_and_load_splits(tmp_path: Path) -> None:
    cases, labels = labelled(12, 18)
    splits = make_splits(cases, labels, folds=3, seed=1)
    save_splits(splits, tmp_path / "splits", dict(zip(cases, labels)))
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["fold_0.csv", "fold_1.csv", "fold_2.csv"]
    assert (tmp_path / "splits" / "fold_0.csv").read_text().splitlines()[0] == "case_id,split,label"
    assert load_splits(tmp_path / "splits") == splits
    assert load_splits(tmp_path / "splits", cases=cases) == splits
    with pytest.raises(CohortError, match="1 unknown case\\(s\\) \\[c000\\], 1 cohort case\\(s\\) missing \\[zz\\]"):
        load_splits(tmp_path / "splits", cases=[c for c in cases if c != "c000"] + ["zz"])


def test_load_splits_errors(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="splits folder not found"):
        load_splits(tmp_path / "none")
    (tmp_path / "s").mkdir()
    with pytest.raises(CohortError, match="no fold_K.csv files"):
        load_splits(tmp_path / "s")
    write_csv(tmp_path / "s" / "fold_1.csv", [["a", "train", "1"]], ["case_id", "split", "label"])
    with pytest.raises(CohortError, match="numbered 0..K-1"):
        load_splits(tmp_path / "s")
    write_csv(tmp_path / "s" / "fold_0.csv", [["a", "train", "1"], ["a", "test", "1"]], ["case_id", "split", "label"])
    with pytest.raises(CohortError, match="line 3: case a appears twice"):
        load_splits(tmp_path / "s")
    write_csv(tmp_path / "s" / "fold_0.csv", [["a", "holdout", "1"]], ["case_id", "split", "label"])
    with pytest.raises(CohortError, match="split 'holdout' is not one of train, val, test"):
        load_splits(tmp_path / "s")
