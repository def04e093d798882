"""Exact, deterministic k-nearest-neighbour tables over patch coordinates (numpy/scipy only, no torch).

A slide's graph is a neighbour table ``(N, W)`` of row indices, ``-1`` padded, self excluded; the model adds the
self loop. ``knn_table`` lists, for every row, its ``k`` nearest *other* rows by Euclidean distance, ordered by
(distance, row index): ties, which are the rule on a regular patch grid, go to the smaller row index, so training
and inference build the identical graph whatever the input order of the tree search.

Exactness: distances are compared as squared distances computed exactly, in int64 for integer-valued
coordinates (any dtype; float coordinates that are whole numbers below 2**30 take this path too, where float64
would give the same values) and in float64 (``dx * dx + dy * dy``) otherwise. Two search paths give the same
answer:

* lattice: integer coordinates on a common step (a TRIDENT/CLAM patch grid, holes allowed) are looked up in a
  dense cell map through a stencil of offsets that holds every lattice point within a radius; a row with at
  least ``k`` neighbours inside the stencil is final, because every point outside is strictly farther.
* tree: any other input, and the rows the stencil could not settle, query a ``cKDTree`` for ``k + 2``
  candidates, re-rank them exactly and keep a row only where the farthest candidate is strictly farther than
  the ``k``-th (so no tie at the ``k``-th distance can lie outside the candidates); other rows are asked again
  with twice as many candidates, until all candidates of the slide are in play.

Repeated coordinates: ``neighbor_table`` (the one graph function of training and inference) refuses a slide
whose coordinates repeat (:class:`DuplicateCoordsError`, naming how many rows repeat): TRIDENT and CLAM write
every patch once, so a repeat means a broken coords dataset (all zeros, a patch written twice), and a
neighbour search among rows at distance 0 has no meaningful answer and costs the square of the repeats (every
tie at the k-th distance must be examined: 100k identical rows take hours). ``knn_table`` and
``sklearn_knn_table`` themselves stay exact for repeats (ties at distance 0 by row index, resp. in tree order),
at that quadratic cost.

The ``official`` graph direction reproduces the authors' released code exactly, neighbour *sets* included: they
build the k-NN with scikit-learn's ``kneighbors_graph`` (a KD-tree for 2-D coordinates), whose ties at the
k-th distance fall in tree order, not by row index; on a patch grid about half the rows then get a different
8-NN set than ``knn_table``. ``sklearn_knn_table`` calls that same function (scikit-learn is needed for
official models only; the model folder records its version, ``graph_library``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

DIRECTIONS = ("paper", "official")

_COORD_LIMIT = 2**30          # float coords that are whole numbers below this are handled as int64
_SPAN_LIMIT = 2**31           # integer span per axis: squared distances stay below 2**63
_LATTICE_CELLS_PER_ROW = 32   # the lattice path's dense map may hold at most this many cells per row
_STENCIL_FACTOR = 3           # the stencil holds at least this many times k lattice offsets
_TREE_REL_TOL = 1e-9          # slack for the tree's own rounding when checking that a candidate set is complete
_CHUNK_ELEMENTS = 2**22       # rows x candidates per tree query batch (bounds memory on heavy duplicates)


class DuplicateCoordsError(ValueError):
    """Two or more rows of a slide sit at the same coordinates (``neighbor_table`` refuses such a slide)."""


def repeated_rows(coords: np.ndarray) -> int:
    """How many rows of ``coords`` (N, 2) repeat the position of another row (N minus the distinct positions);
    validates ``coords`` as :func:`knn_table` does. O(N log N)."""
    c = _exact_coords(coords)
    if len(c) < 2:
        return 0
    order = np.lexsort((c[:, 1], c[:, 0]))
    s = c[order]
    return int(((s[1:, 0] == s[:-1, 0]) & (s[1:, 1] == s[:-1, 1])).sum())


def _exact_coords(coords: np.ndarray) -> np.ndarray:
    """Validate ``coords`` (N, 2) and return the exact working array: (N, 2) int64 shifted to a zero minimum per
    axis (distances are unchanged) for integer-valued input, else (N, 2) float64 as given."""
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {c.shape}")
    if c.dtype.kind not in "iuf":
        raise ValueError(f"coords must be integer or float, got dtype {c.dtype}")
    if len(c) == 0:
        return c.astype(np.int64 if c.dtype.kind in "iu" else np.float64)
    if c.dtype.kind == "f":
        c = c.astype(np.float64, copy=False)
        if not np.isfinite(c).all():
            raise ValueError("coords contain NaN or infinite values")
        if not (np.abs(c) < _COORD_LIMIT).all() or not (c == np.round(c)).all():
            return c
    elif c.dtype.kind == "u":
        c = c - c.min(axis=0)
    lo, hi = c.min(axis=0), c.max(axis=0)
    if (hi.astype(np.float64) - lo.astype(np.float64) >= _SPAN_LIMIT).any():
        raise ValueError(f"coords span {hi - lo} exceeds {_SPAN_LIMIT - 1} on an axis (squared distances overflow)")
    return c.astype(np.int64) - lo.astype(np.int64)


@lru_cache(maxsize=16)
def _stencil(k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Lattice offsets (S, 2) int64 without (0, 0), sorted by squared length (then a, b), their squared-length rank
    (S,) int64, and the radius bound r (|a|, |b| <= r). The stencil is every offset with a^2 + b^2 <= R^2 for
    the smallest integer R^2 that gives at least ``_STENCIL_FACTOR * k`` offsets."""
    need = _STENCIL_FACTOR * k
    r = 1
    while True:
        a, b = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
        off = np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int64)
        d2 = (off * off).sum(axis=1)
        off, d2 = off[d2 > 0], d2[d2 > 0]
        radius2 = np.sort(d2)[need - 1] if len(d2) >= need else None
        if radius2 is not None and radius2 <= r * r:   # the box holds the whole disc of that radius
            keep = d2 <= radius2
            off, d2 = off[keep], d2[keep]
            order = np.lexsort((off[:, 1], off[:, 0], d2))
            off, d2 = off[order], d2[order]
            return off, np.unique(d2, return_inverse=True)[1].astype(np.int64), r
        r += 1


def _lattice_knn(c: np.ndarray, k: int, table: np.ndarray) -> np.ndarray | None:
    """Fill the rows of ``table`` that the lattice stencil settles; return the rows left for the tree, or None
    when ``c`` (N, 2) int64 (zero-minimum) is not a usable lattice (too sparse, or duplicate points)."""
    n = len(c)
    step = int(np.gcd.reduce(c.ravel()))
    if step == 0:   # every point identical
        return None
    cells = c // step
    off, rank, r = _stencil(k)
    width, height = (cells.max(axis=0) + 1 + 2 * r).tolist()
    if width * height > _LATTICE_CELLS_PER_ROW * n + 4096:
        return None
    index_dtype = np.int32 if n < 2**31 else np.int64
    grid = np.full(width * height, -1, dtype=index_dtype)
    flat = (cells[:, 0] + r) * height + (cells[:, 1] + r)
    rows = np.arange(n, dtype=index_dtype)
    grid[flat] = rows
    if not np.array_equal(grid[flat], rows):   # two rows in one cell
        return None
    cand = grid[flat[:, None] + (off[:, 0] * height + off[:, 1])[None, :]]           # (N, S)
    sentinel = (int(rank.max()) + 1) * n
    key_dtype: type[np.signedinteger] = np.int32 if sentinel < 2**31 else np.int64
    key = np.where(cand >= 0, rank.astype(key_dtype) * key_dtype(n) + cand.astype(key_dtype), key_dtype(sentinel))
    nearest = np.sort(key, axis=1)[:, :k]                                               # (N, k) by (d^2, index)
    done = nearest[:, -1] < sentinel
    table[done] = nearest[done] % n
    return np.flatnonzero(~done)


def _tree_knn(c: np.ndarray, k: int, rows: np.ndarray, table: np.ndarray) -> None:
    """Fill ``table[rows]`` exactly for ``c`` (N, 2) int64 or float64 with a KD-tree, widening the candidate
    count for rows whose tie at the k-th distance may reach beyond the candidates."""
    from scipy.spatial import cKDTree

    n = len(c)
    cf = c.astype(np.float64, copy=False)
    tree = cKDTree(cf)
    kq = min(k + 2, n)
    while rows.size:
        pending = []
        chunk = max(1, _CHUNK_ELEMENTS // kq)
        for start in range(0, rows.size, chunk):
            r = rows[start:start + chunk]
            dist, cand = tree.query(cf[r], k=kq, workers=-1)              # (M, kq), by the tree's distance
            dx = c[cand, 0] - c[r, 0][:, None]
            dy = c[cand, 1] - c[r, 1][:, None]
            sq = dx * dx + dy * dy                                        # exact squared distances
            sq[cand == r[:, None]] = -1                                   # self first
            ordered = (sq[:, :-1] < sq[:, 1:]) | ((sq[:, :-1] == sq[:, 1:]) & (cand[:, :-1] < cand[:, 1:]))
            fix = np.flatnonzero(~ordered.all(axis=1))
            if fix.size:                                                  # re-rank by (squared distance, index)
                by_index = np.argsort(cand[fix], axis=1)
                cand_f = np.take_along_axis(cand[fix], by_index, axis=1)
                sq_f = np.take_along_axis(sq[fix], by_index, axis=1)
                order = np.argsort(sq_f, axis=1, kind="stable")
                cand[fix] = np.take_along_axis(cand_f, order, axis=1)
                sq[fix] = np.take_along_axis(sq_f, order, axis=1)
            # Column 0 is self wherever self is a candidate. It is not one only when at least kq rows sit at tree
            # distance 0, and then dist[:, -1] == 0 marks the row incomplete; with kq == n self is always there.
            m = min(k, kq - 1)
            table[r, :m] = cand[:, 1:m + 1]
            if kq < n:   # complete when the farthest candidate is strictly beyond the k-th neighbour
                complete = dist[:, -1] ** 2 > sq[:, k].astype(np.float64) * (1.0 + _TREE_REL_TOL)
                pending.append(r[~complete])
        rows = np.concatenate(pending) if pending else rows[:0]
        kq = min(2 * kq, n)


def knn_table(coords: np.ndarray, k: int = 8) -> np.ndarray:
    """The k nearest other rows of every row, exact and deterministic.

    Args:
        coords: (N, 2) patch coordinates, any integer or float dtype (finite).
        k: neighbours per row, >= 1.

    Returns:
        (N, k) int64: row i lists the k rows j != i nearest to row i by Euclidean distance, ordered by
        (distance, j); duplicate coordinates are at distance 0 (exact, but the search costs the square of the
        largest group of repeats: ``neighbor_table`` refuses repeats). When N <= k a row has N - 1 neighbours,
        then -1.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    c = _exact_coords(coords)
    n = len(c)
    table = np.full((n, k), -1, dtype=np.int64)
    if n <= 1:
        return table
    rows = _lattice_knn(c, k, table) if c.dtype == np.int64 else None
    if rows is None:
        rows = np.arange(n)
    if rows.size:
        _tree_knn(c, k, rows, table)
    return table


def sklearn_version() -> str:
    """The installed scikit-learn version; a one-line ImportError naming the fix when it is missing."""
    try:
        import sklearn
    except ImportError:
        raise ImportError("the official graph (the authors' neighbour sets) needs scikit-learn: "
                          "pip install scikit-learn") from None
    return str(sklearn.__version__)


def sklearn_knn_table(coords: np.ndarray, k: int = 8) -> np.ndarray:
    """The authors' k-NN: ``sklearn.neighbors.kneighbors_graph(coords, k, include_self=False)`` as a table.

    Args:
        coords: (N, 2) patch coordinates (finite; any integer or float dtype).
        k: neighbours per row, >= 1.

    Returns:
        (N, k) int64: row i lists scikit-learn's k nearest rows j != i (its tie order), -1 padded; when N <= k a
        row has N - 1 neighbours (the authors' ``test.py`` uses ``min(k, N - 1)``), N = 1 has none.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    sklearn_version()
    from sklearn.neighbors import kneighbors_graph

    c = _exact_coords(coords)
    n = len(c)
    table = np.full((n, int(k)), -1, dtype=np.int64)
    if n <= 1:
        return table
    k_eff = min(int(k), n - 1)
    adjacency = kneighbors_graph(np.asarray(coords, dtype=np.float64), k_eff, mode="connectivity",
                                 include_self=False)
    if not (np.diff(adjacency.indptr) == k_eff).all():
        raise ValueError(f"kneighbors_graph did not return {k_eff} neighbours for each of {n} rows")
    table[:, :k_eff] = adjacency.indices.reshape(n, k_eff)
    return table


def reverse_table(table: np.ndarray) -> np.ndarray:
    """The reverse of a neighbour table (the authors' graph direction).

    Args:
        table: (N, K) integer neighbour table, entries in [-1, N), -1 = padding.

    Returns:
        (N, W) int64: row i lists, ascending, every row j != i with i in table[j]; W = max in-degree (at least
        1), -1 padded.
    """
    t = np.asarray(table)
    if t.ndim != 2 or t.dtype.kind not in "iu":
        raise ValueError(f"table must be a 2-D integer array, got shape {t.shape} dtype {t.dtype}")
    n = t.shape[0]
    if t.size and (t.min() < -1 or t.max() >= n):
        raise ValueError(f"table entries must lie in [-1, {n}), got [{t.min()}, {t.max()}]")
    t = t.astype(np.int64, copy=False)
    source = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], t.shape)
    valid = (t >= 0) & (t != source)
    key = np.unique(t[valid] * n + source[valid])          # sorted by (listed row i, listing row j), no repeats
    i, j = key // n, key % n
    counts = np.bincount(i, minlength=n)
    out = np.full((n, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    out[i, np.arange(len(key)) - (np.cumsum(counts) - counts)[i]] = j
    return out


def neighbor_table(coords: np.ndarray, k: int = 8, direction: str = "paper") -> np.ndarray:
    """The neighbour table every model takes.

    Args:
        coords: (N, 2) patch coordinates.
        k: neighbours per row of the k-NN table.
        direction: "paper" (row i gathers from its k nearest rows: ``knn_table``) or "official" (row i gathers
            from the rows that list i among their k nearest, with scikit-learn's neighbour sets:
            ``reverse_table(sklearn_knn_table(...))``, exactly the released code's graph).

    Returns:
        (N, W) int64, -1 padded, no self: W = k for "paper", the maximum in-degree (>= 1) for "official".

    Raises:
        DuplicateCoordsError: coordinates repeat (see the module docstring); checked in O(N log N) before any
            neighbour search, for both directions.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}, got {direction!r}")
    if direction == "official":
        sklearn_version()   # the missing library is the model's problem, not this slide's: say it first
    repeats = repeated_rows(coords)
    if repeats:
        raise DuplicateCoordsError(
            f"coords repeat: {repeats} of {len(coords)} rows sit at the position of another row (TRIDENT/CLAM "
            "write every patch once; a neighbour graph needs distinct patch positions)")
    if direction == "paper":
        return knn_table(coords, k)
    return reverse_table(sklearn_knn_table(coords, k))


def to_edge_index(table: np.ndarray) -> np.ndarray:
    """The edge list of a neighbour table, in PyG's ``source_to_target`` flow.

    Args:
        table: (N, W) integer neighbour table, -1 = padding.

    Returns:
        (2, E) int64: row 0 source j, row 1 target i, one edge per entry j = table[i, c] >= 0 (target i gathers
        from source j), ordered by target, then table column.
    """
    t = np.asarray(table)
    if t.ndim != 2 or t.dtype.kind not in "iu":
        raise ValueError(f"table must be a 2-D integer array, got shape {t.shape} dtype {t.dtype}")
    target = np.broadcast_to(np.arange(t.shape[0], dtype=np.int64)[:, None], t.shape)
    valid = t >= 0
    return np.stack([t[valid].astype(np.int64), target[valid]])
