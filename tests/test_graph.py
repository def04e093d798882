"""momkd.graph: exact k-NN tables (brute-force oracle), reverse tables, edge lists, determinism, torch-free import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from momkd import graph
from momkd.graph import sklearn_knn_table, knn_table, neighbor_table, reverse_table, to_edge_index


def oracle_knn(coords: np.ndarray, k: int) -> np.ndarray:
    """Brute force: every pairwise squared distance (int64 for integer dtypes, float64 otherwise), each row
    lexsorted by (distance, index), self dropped, -1 padded."""
    c = np.asarray(coords)
    c = c.astype(np.int64 if c.dtype.kind in "iu" else np.float64)
    n = len(c)
    out = np.full((n, k), -1, dtype=np.int64)
    if n < 2:
        return out
    d = c[None, :, :] - c[:, None, :]
    sq = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), sq), axis=-1)
    order = order[order != np.arange(n)[:, None]].reshape(n, n - 1)
    m = min(k, n - 1)
    out[:, :m] = order[:, :m]
    return out


def oracle_rows(coords: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """The oracle for a few rows of a large slide (one row at a time)."""
    c = np.asarray(coords)
    c = c.astype(np.int64 if c.dtype.kind in "iu" else np.float64)
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for r, i in enumerate(rows):
        d = c - c[i]
        order = np.lexsort((np.arange(len(c)), d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]))
        order = order[order != i][:k]
        out[r, :len(order)] = order
    return out


def grid_with_holes(n: int, seed: int = 0, fill: float = 0.75, step: int = 256) -> np.ndarray:
    """(n, 2) int64 TRIDENT-like patch grid (multiples of ``step``) with random holes: many exact ties."""
    rng = np.random.default_rng(seed)
    side = max(1, int(np.ceil(np.sqrt(n / fill))))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return grid[np.sort(rng.permutation(len(grid))[:n])].astype(np.int64) * step


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    full = np.stack(np.meshgrid(np.arange(24), np.arange(20), indexing="ij"), -1).reshape(-1, 2) * 256
    holes = grid_with_holes(900, seed=1)
    dup = np.concatenate([holes[:150], holes[:150][rng.permutation(150)[:60]], holes[:10]])
    line = np.arange(60)
    return {
        "random_float": rng.uniform(0, 5000, (700, 2)),
        "regular_grid": full,
        "regular_grid_shuffled": full[rng.permutation(len(full))],
        "grid_with_holes": holes,
        "grid_two_tissue_pieces": np.concatenate([holes[:300], holes[:300] + [256 * 200, 256 * 7]]),
        "grid_offset_far_from_origin": holes[:400] + [10**8 + 128, 3 * 10**7],
        "grid_anisotropic": (grid_with_holes(400, seed=2) // 256) * [256, 512],
        "duplicates": dup[rng.permutation(len(dup))],
        "all_identical": np.full((30, 2), 512, dtype=np.int64),
        "collinear_horizontal": np.stack([line * 256, np.zeros_like(line)], 1),
        "collinear_diagonal": np.stack([line * 3, line * 3], 1),
        "float_ties": rng.integers(0, 12, (300, 2)) * 0.25,
        "random_ints_wide": rng.integers(-10**6, 10**6, (400, 2)),
        "random_ints_dense": rng.integers(0, 25, (400, 2)),   # lattice-sized, but with duplicates
        "n1": np.array([[7, 9]]),
        "n2": np.array([[0, 0], [256, 0]]),
        "n9": holes[:9],
        "n8": holes[:8],
    }


CASES = _cases()


@pytest.mark.parametrize("k", [1, 4, 8, 16])
@pytest.mark.parametrize("name", list(CASES))
def test_knn_table_matches_brute_force(name: str, k: int) -> None:
    coords = CASES[name]
    got = knn_table(coords, k)
    assert got.dtype == np.int64 and got.shape == (len(coords), k)
    np.testing.assert_array_equal(got, oracle_knn(coords, k))


@pytest.mark.parametrize("k", [4, 8, 16])
def test_small_n_sizes(k: int) -> None:
    coords = grid_with_holes(64, seed=3)
    for n in (0, 1, 2, 3, k - 1, k, k + 1, k + 2, 2 * k + 3):
        got = knn_table(coords[:n], k)
        np.testing.assert_array_equal(got, oracle_knn(coords[:n], k))
        assert (got[:, : max(n - 1, 0)] >= 0).all() and (got[:, max(n - 1, 0):] == -1).all()
    assert knn_table(np.zeros((0, 2)), k).shape == (0, k)
    np.testing.assert_array_equal(knn_table(np.array([[3.0, 4.0]]), k), np.full((1, k), -1))


def test_fuzz_small_slides_against_brute_force() -> None:
    rng = np.random.default_rng(7)
    for trial in range(250):
        n, k = int(rng.integers(1, 70)), int(rng.integers(1, 20))
        kind = trial % 5
        if kind == 0:
            coords = rng.integers(0, int(rng.integers(1, 12)), (n, 2))
        elif kind == 1:
            coords = rng.integers(0, 6, (n, 2)) * 0.5
        elif kind == 2:
            coords = rng.integers(-10**5, 10**5, (n, 2))
        elif kind == 3:
            coords = (rng.integers(0, 10, (n, 2)) * 256).astype(np.int32)
        else:
            coords = np.round(rng.normal(size=(n, 2)), 1)
        np.testing.assert_array_equal(knn_table(coords, k), oracle_knn(coords, k), err_msg=f"trial {trial}")


def test_tree_path_alone_is_exact_on_a_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the lattice lookup switched off, the KD-tree path must settle the grid's ties on its own."""
    monkeypatch.setattr(graph, "_lattice_knn", lambda c, k, table: None)
    for name in ("regular_grid", "grid_with_holes", "duplicates"):
        coords = CASES[name]
        np.testing.assert_array_equal(knn_table(coords, 8), oracle_knn(coords, 8), err_msg=name)


@pytest.mark.parametrize("kind", ["grid", "random"])
def test_large_slide_rows_and_paths_agree(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    n = 20000
    coords = grid_with_holes(n, seed=5) if kind == "grid" else rng.uniform(0, 1e5, (n, 2))
    got = knn_table(coords, 8)
    rows = rng.choice(n, 60, replace=False)
    np.testing.assert_array_equal(got[rows], oracle_rows(coords, 8, rows))
    if kind == "grid":
        monkeypatch.setattr(graph, "_lattice_knn", lambda c, k, table: None)
        np.testing.assert_array_equal(knn_table(coords, 8), got)


def test_deterministic_and_dtype_invariant() -> None:
    coords = CASES["grid_with_holes"]
    ref = knn_table(coords, 8)
    np.testing.assert_array_equal(knn_table(coords, 8), ref)
    for dtype in (np.int32, np.int64, np.uint32, np.float32, np.float64):
        np.testing.assert_array_equal(knn_table(coords.astype(dtype), 8), ref, err_msg=str(dtype))
    np.testing.assert_array_equal(knn_table(coords.tolist(), 8), ref)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        knn_table(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        knn_table(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="integer or float"):
        knn_table(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="span"):
        knn_table(np.array([[0, 0], [2**40, 0]]))
    for bad_k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            knn_table(np.zeros((4, 2)), bad_k)


def naive_reverse(table: np.ndarray) -> list[list[int]]:
    n = len(table)
    return [sorted({j for j in range(n) if j != i and i in set(table[j].tolist())}) for i in range(n)]


@pytest.mark.parametrize("name", ["grid_with_holes", "random_float", "duplicates", "n2", "n9"])
def test_reverse_table_matches_naive_loop(name: str) -> None:
    table = knn_table(CASES[name], 8)
    rev = reverse_table(table)
    want = naive_reverse(table)
    assert rev.dtype == np.int64 and rev.shape == (len(table), max(1, max(map(len, want))))
    for i, row in enumerate(rev):
        assert row[row >= 0].tolist() == want[i] and (row[len(want[i]):] == -1).all()


def test_reverse_table_generic_table() -> None:
    """Padding, self entries and repeated entries in a hand-made table; N = 0 and in-degree 0 give W = 1."""
    table = np.array([[1, 1, -1], [0, 1, 2], [-1, -1, -1], [2, 0, 1]])
    np.testing.assert_array_equal(reverse_table(table), [[1, 3], [0, 3], [1, 3], [-1, -1]])
    assert reverse_table(np.zeros((0, 8), np.int64)).shape == (0, 1)
    np.testing.assert_array_equal(reverse_table(np.full((3, 2), -1)), np.full((3, 1), -1))
    with pytest.raises(ValueError, match="entries"):
        reverse_table(np.array([[1], [2]]))


def test_neighbor_table_directions() -> None:
    coords = CASES["grid_with_holes"]
    np.testing.assert_array_equal(neighbor_table(coords), knn_table(coords, 8))
    np.testing.assert_array_equal(neighbor_table(coords, 4, "official"), reverse_table(sklearn_knn_table(coords, 4)))
    with pytest.raises(ValueError, match="'paper', 'official'"):
        neighbor_table(coords, direction="reverse")


def test_to_edge_index_semantics() -> None:
    table = np.array([[1, 2], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(to_edge_index(table), [[1, 2, 0], [0, 0, 1]])   # [source, target]
    assert to_edge_index(np.zeros((0, 8), np.int64)).shape == (2, 0)

    coords = CASES["grid_with_holes"]
    knn = knn_table(coords, 8)
    paper = to_edge_index(neighbor_table(coords, 8, "paper"))
    assert paper.dtype == np.int64
    assert np.all(np.diff(paper[1]) >= 0)                                    # ordered by target
    for i in (0, 17, len(coords) - 1):
        np.testing.assert_array_equal(paper[0, paper[1] == i], knn[i])       # target i gathers from knn(i), in order

    # official: the authors' edge_index = kneighbors_graph(coords, 8).nonzero() = [query i, neighbour j], read by
    # PyG as [source, target]: target j gathers from every query i that lists j
    kneighbors_graph = pytest.importorskip("sklearn.neighbors").kneighbors_graph
    official = to_edge_index(neighbor_table(coords, 8, "official"))
    queries, neighbours = kneighbors_graph(coords, 8, include_self=False).nonzero()
    assert set(zip(official[0].tolist(), official[1].tolist())) == set(zip(queries.tolist(), neighbours.tolist()))
    assert official.shape[1] == len(queries)


def test_sklearn_knn_table_is_the_authors_graph() -> None:
    """The official neighbour sets are scikit-learn's (tree-order ties), which on a patch grid differ from the
    (distance, index) order of knn_table in many rows, while every row is still a true k-NN set."""
    neighbors = pytest.importorskip("sklearn.neighbors")
    coords = CASES["grid_with_holes"]
    table = sklearn_knn_table(coords, 8)
    np.testing.assert_array_equal(table,
                                  neighbors.kneighbors_graph(coords, 8, include_self=False).indices.reshape(-1, 8))
    exact = knn_table(coords, 8)
    assert sum(set(a) != set(b) for a, b in zip(table, exact)) > len(coords) // 10
    dist = lambda t: np.sort(((coords[t] - coords[:, None, :]) ** 2).sum(-1), axis=1)  # noqa: E731
    np.testing.assert_array_equal(dist(table), dist(exact))
    for n in (1, 2, 5, 9):
        small = sklearn_knn_table(coords[:n], 8)
        assert small.shape == (n, 8) and ((small >= 0).sum(axis=1) == min(8, n - 1)).all()
    dup = np.zeros((20, 2), np.int64)                       # all points identical: self is never listed
    assert not (sklearn_knn_table(dup, 8) == np.arange(20)[:, None]).any()


def test_official_graph_without_sklearn_says_what_to_install() -> None:
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "import numpy as np, momkd.graph as g\n"
            "try:\n    g.neighbor_table(np.zeros((3, 2)), 8, 'official')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install scikit-learn" in out


def test_to_edge_index_is_pyg_source_to_target() -> None:
    """A PyG MessagePassing sum (flow source_to_target) over to_edge_index equals the sum over the table."""
    torch = pytest.importorskip("torch")
    message_passing = pytest.importorskip("torch_geometric.nn").MessagePassing

    class SumNeighbours(message_passing):
        def __init__(self) -> None:
            super().__init__(aggr="add", flow="source_to_target")

        def forward(self, x: "torch.Tensor", edge_index: "torch.Tensor") -> "torch.Tensor":
            return self.propagate(edge_index, x=x)

    coords = CASES["grid_with_holes"][:300]
    x = np.random.default_rng(0).standard_normal((len(coords), 3))
    for direction in ("paper", "official"):
        table = neighbor_table(coords, 8, direction)
        want = np.where((table >= 0)[..., None], x[table], 0.0).sum(axis=1)
        got = SumNeighbours()(torch.from_numpy(x), torch.from_numpy(to_edge_index(table))).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=direction)


def test_imports_without_torch() -> None:
    # torch made unimportable by a finder (a None entry in sys.modules would trip scipy's array-API probe,
    # which sklearn runs; a machine without torch has no entry at all)
    code = ("import sys, importlib.abc\n"
            "class NoTorch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import numpy as np, momkd.graph as g\n"
            "assert g.neighbor_table(np.array([[0, 0], [256, 0], [0, 256]]), 8, 'official').shape == (3, 2)\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("direction", ["paper", "official"])
def test_repeated_coords_are_refused_in_linearithmic_time(direction: str) -> None:
    """100k identical rows: an exact k-NN would take hours (every tie at distance 0 examined); refused at once."""
    if direction == "official":
        pytest.importorskip("sklearn")
    import time

    t0 = time.perf_counter()
    with pytest.raises(graph.DuplicateCoordsError, match=r"coords repeat: 99999 of 100000 rows"):
        neighbor_table(np.zeros((100_000, 2), np.int64), 8, direction)
    assert time.perf_counter() - t0 < 5
    coords = CASES["grid_with_holes"].copy()
    coords[17] = coords[400]
    coords[18] = coords[400]
    with pytest.raises(graph.DuplicateCoordsError, match=rf"coords repeat: 2 of {len(coords)} rows"):
        neighbor_table(coords, 8, direction)


def test_repeated_rows_counts_exact_repeats_only() -> None:
    assert graph.repeated_rows(np.zeros((0, 2))) == 0
    assert graph.repeated_rows(np.array([[1.5, 2.0], [1.5, 2.0], [2.0, 1.5], [1.5, 2.0000001]])) == 1
    assert graph.repeated_rows(CASES["duplicates"]) == len(CASES["duplicates"]) - len(np.unique(CASES["duplicates"],
                                                                                                   axis=0))
    for name in ("regular_grid_shuffled", "grid_with_holes", "random_float", "collinear_diagonal"):
        assert graph.repeated_rows(CASES[name]) == 0, name
        np.testing.assert_array_equal(neighbor_table(CASES[name], 8), knn_table(CASES[name], 8))
