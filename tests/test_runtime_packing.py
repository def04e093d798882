"""Packing slides into ragged batches: offsets, shifted neighbours (-1 kept), oversized slides alone, buffers."""

from __future__ import annotations

import numpy as np
import pytest

from momkd.data.batch import GraphSlide, pack_slides, shift_neighbors, split_outputs
from momkd.runtime.packing import BufferPool, Packer


def _slide(index: int, n: int, dim: int = 4, width: int = 3, seed: int = 0) -> GraphSlide:
    rng = np.random.default_rng(seed + index)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    nb = rng.integers(-1, n, size=(n, width)).astype(np.int64)
    return GraphSlide(index=index, slide_id=f"s{index}", features=feats, neighbors=nb, n=n)


def _copy(s: GraphSlide) -> tuple[np.ndarray, np.ndarray]:
    return s.features.copy(), s.neighbors.copy()


def test_shift_neighbors_keeps_padding() -> None:
    nb = np.array([[1, -1], [0, 2], [-1, -1]], dtype=np.int64)
    out = shift_neighbors(nb, 10, width=3)
    assert out.tolist() == [[11, -1, -1], [10, 12, -1], [-1, -1, -1]]
    assert shift_neighbors(nb, 0) is nb   # no copy when nothing changes


def test_pack_offsets_and_global_neighbours() -> None:
    slides = [_slide(0, 5), _slide(1, 1, width=2), _slide(2, 7, width=4)]
    orig = [_copy(s) for s in slides]
    pack = pack_slides(slides)
    assert pack.slide_offsets.tolist() == [0, 5, 6, 13]
    assert pack.features.dtype == np.float32 and pack.features.flags.c_contiguous
    assert pack.neighbors.shape == (13, 4) and pack.neighbors.dtype == np.int64
    for (feats, nb), e in zip(orig, pack.entries):
        r0, r1 = e.offset, e.offset + e.n
        np.testing.assert_array_equal(pack.features[r0:r1], feats)
        got = pack.neighbors[r0:r1]
        w = nb.shape[1]
        np.testing.assert_array_equal(got[:, :w], np.where(nb >= 0, nb + r0, -1))
        assert (got[:, w:] == -1).all()
        valid = got[got >= 0]
        assert ((valid >= r0) & (valid < r1)).all()   # a slide never sees another slide's rows
    assert all(s.features is not None for s in slides)   # the reference packer leaves the slides alone
    packer = Packer(max_rows=100)
    for s in slides:
        assert not packer.add(s)
    streamed = packer.finish()
    np.testing.assert_array_equal(streamed.features, pack.features)
    np.testing.assert_array_equal(streamed.neighbors, pack.neighbors)
    assert all(s.features is None for s in slides)    # the streaming packer releases each slide once copied


def test_packer_respects_budget_and_order() -> None:
    sizes = [30, 30, 30, 50, 10, 250, 5, 100, 1]
    packer = Packer(max_rows=100)
    packs = []
    for i, n in enumerate(sizes):
        packs += packer.add(_slide(i, n))
    packs.append(packer.finish())
    groups = [[e.index for e in p.entries] for p in packs]
    assert groups == [[0, 1, 2], [3, 4], [5], [6], [7], [8]]   # 250 > budget alone; 100 == budget alone
    for p in packs:
        assert p.rows <= 100 or p.n_slides == 1
    assert [e.index for p in packs for e in p.entries] == list(range(len(sizes)))


def test_ramp_starts_with_small_packs() -> None:
    packer = Packer(max_rows=80, ramp=2)          # limits 20, 40, 80, 80, ...
    packs = [p for i in range(20) for p in packer.add(_slide(i, 10))] + [packer.finish()]
    assert [p.rows for p in packs] == [20, 40, 80, 60]
    again = Packer(max_rows=80, ramp=2)
    assert [p.rows for i in range(20) for p in again.add(_slide(i, 10))] == [20, 40, 80]   # same sizes, same packs


def test_single_slide_pack_is_not_copied() -> None:
    s = _slide(0, 500)
    feats = s.features
    (pack,) = Packer(max_rows=100).add(s)
    assert pack.features is feats and pack.slide_offsets.tolist() == [0, 500]


def test_max_slides_per_pack() -> None:
    packer = Packer(max_rows=1000, max_slides=2)
    packs = []
    for i in range(5):
        packs += packer.add(_slide(i, 3))
    packs.append(packer.finish())
    assert [p.n_slides for p in packs] == [2, 2, 1]


def test_buffer_pool_reuses_memory() -> None:
    pool = BufferPool(capacity_rows=64)
    packer = Packer(max_rows=64, pool=pool)
    bases = set()
    for i in range(20):                     # 20-row slides: packs of 3, each released after "compute"
        for pack in packer.add(_slide(i, 20)):
            assert pack.n_slides == 3 and pack.on_release is not None
            bases.add(id(pack.features.base))
            pack.release()
    assert len(bases) == 1 and pool.created == 1     # one buffer, reused from pack to pack
    held = packer.finish()
    held2 = [p for i in range(4) for p in packer.add(_slide(100 + i, 20))]
    assert len(held2) == 1 and pool.created == 2      # a pack still held: a second buffer, never a wait
    assert held.features.base is not held2[0].features.base


def test_split_outputs_by_offsets() -> None:
    pack = pack_slides([_slide(0, 2), _slide(1, 3)])
    outs = {"probability": np.array([0.1, 0.9], np.float32), "logits": np.zeros((2, 2), np.float32),
            "attention": np.arange(5, dtype=np.float32), "patch_score": -np.arange(5, dtype=np.float32)}
    a, b = split_outputs(pack, outs)
    assert a["probability"] == pytest.approx(0.1) and b["probability"] == pytest.approx(0.9)
    assert a["attention"].tolist() == [0, 1] and b["attention"].tolist() == [2, 3, 4]
    assert b["patch_score"].tolist() == [-2, -3, -4]


def test_reference_packing_works_under_python_O() -> None:
    """The reference packer does its work outside any ``assert`` (``python -O`` strips asserts)."""
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from momkd.data.batch import GraphSlide, pack_slides\n"
            "s = [GraphSlide(f's{i}', np.ones((n, 3), np.float32), np.full((n, 2), -1), n)"
            " for i, n in enumerate((2, 5))]\n"
            "p = pack_slides(s)\n"
            "print(p.slide_offsets.tolist(), p.features.shape)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[0, 2, 7] (7, 3)"


def test_pack_singles_are_local_packs() -> None:
    pack = pack_slides([_slide(0, 4), _slide(1, 3, width=2)])
    singles = pack.singles()
    assert [p.slide_offsets.tolist() for p in singles] == [[0, 4], [0, 3]]
    for single, entry in zip(singles, pack.entries):
        assert single.neighbors.max() < entry.n and single.entries[0].offset == 0
        np.testing.assert_array_equal(single.features, pack.features[entry.offset:entry.offset + entry.n])
