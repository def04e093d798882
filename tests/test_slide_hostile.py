"""Hostile slide files (issue 12): whatever a file's data is not really in it, or is not what it claims to be, is
refused with a one-line ``SlideError`` (by ``read_slide_header`` too, where no data needs reading), and nothing it
points to is ever opened; good files of every layout still read bit-identically. One group per failure class."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from h5py import h5d, h5o, h5p, h5s, h5t, h5z

from momkd.data.slide import (
    _btree_chunks,
    _chunk_table,
    _dataset_chunks,
    _filter_plugins_loaded,
    _header_layout,
    _read_row_chunks,
    _stored_layout,
    read_slide,
    read_slide_header,
)
from momkd.errors import SlideDtypeError, SlideError, SlideUnreadableError
from momkd.synth import write_slide_h5

N, D = 30, 6


def sample(n: int = N, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 features and (n, 2) int64 level-0 coords on a 256-pixel grid."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 400, size=(n, 2)) * 256


def write(path: Path, features: np.ndarray | None = None, coords: np.ndarray | None = None, **features_layout) -> Path:
    """A slide file with ``features`` created with ``features_layout`` (create_dataset keywords) and plain coords."""
    f, c = sample()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=f if features is None else features, **features_layout)
        h5["coords"] = c if coords is None else coords
    return path


def refused(path: Path, code: str, fragment: str, header: bool = True) -> SlideError:
    """``read_slide`` (and ``read_slide_header`` when ``header``) refuse ``path``: ``code``, one line naming the
    file, ``fragment`` in the message."""
    for reader in (read_slide, read_slide_header) if header else (read_slide,):
        with pytest.raises(SlideError) as info:
            reader(path)
        e = info.value
        assert (e.code, e.path) == (code, path), str(e)
        assert fragment in e.message, e.message
        assert str(e) == f"{path}: {e.message}" and "\n" not in str(e)
    return e


CHILD_READ = """\
import sys
from momkd.data.slide import read_slide, read_slide_header
from momkd.errors import SlideError
for reader in (read_slide, read_slide_header):
    try:
        reader(sys.argv[1])
        print("accepted")
    except SlideError as e:
        print(e.code, str(e))
"""


def refused_without_blocking(path: Path, code: str, fragment: str) -> None:
    """``refused``, run in a child process killed after 60 s: the slide points to a FIFO, which blocks forever
    whatever opens it (h5py keeps the GIL while HDF5 waits, so a watchdog thread could not even run)."""
    try:
        done = subprocess.run([sys.executable, "-c", CHILD_READ, str(path)], capture_output=True, text=True,
                              timeout=60, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} blocked: something it points to was opened")
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.startswith(f"{code} {path}: ") and fragment in line, line


# --------------------------------------------------------------------------- 1. rows never written
def _resized_never_written(path: Path) -> Path:   # a TRIDENT-style append cut off after the resize
    f, c = sample()
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features", data=f[:20], chunks=(1, D), maxshape=(None, D))
        ds.resize(N, axis=0)
        h5.create_dataset("coords", data=c, chunks=(1, 2), maxshape=(None, 2))
    return path


def _presized_holes(path: Path) -> Path:
    f, _ = sample()
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features", shape=(N, D), chunks=(1, D), dtype="f4")
        for rows in (slice(0, 5), slice(10, 15), slice(16, N)):
            ds[rows] = f[rows]
        h5["coords"] = sample()[1]
    return path


def _many_holes(path: Path) -> Path:
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features", shape=(N, D), chunks=(1, D), dtype="f4")
        ds[::2] = sample()[0][::2]
        h5["coords"] = sample()[1]
    return path


def _coords_never_written(path: Path) -> Path:
    with h5py.File(path, "w") as h5:
        h5["features"] = sample()[0]
        h5.create_dataset("coords", shape=(N, 2), chunks=(8, 2), dtype="i8")[:8] = sample()[1][:8]
    return path


def _column_chunk_missing(path: Path) -> Path:   # chunks split rows: one half of rows 10-19 missing
    f, _ = sample()
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features", shape=(N, D), chunks=(10, 3), dtype="f4")
        ds[:, :3] = f[:, :3]
        ds[:10, 3:] = f[:10, 3:]
        ds[20:, 3:] = f[20:, 3:]
        h5["coords"] = sample()[1]
    return path


def _compressed_with_gap(path: Path) -> Path:
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("features", shape=(N, D), chunks=(4, D), dtype="f4", compression="gzip")
        ds[:24] = sample()[0][:24]
        h5["coords"] = sample()[1]
    return path


def _contiguous_no_storage(path: Path) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", shape=(N, D), dtype="f4")
        h5["coords"] = sample()[1]
    return path


UNWRITTEN = {
    "resized": (_resized_never_written, "features rows 20-29 were never written (10 of 30 rows, 10 of 30 chunks; "
                                        "file from an interrupted writer?)"),
    "holes": (_presized_holes, "features rows 5-9, 15 were never written (6 of 30 rows, 6 of 30 chunks"),
    "many holes": (_many_holes, "features rows 1, 3, 5 and 12 more ranges were never written (15 of 30 rows"),
    "coords": (_coords_never_written, "coords rows 8-29 were never written (22 of 30 rows, 3 of 4 chunks"),
    "column chunk": (_column_chunk_missing, "features rows 10-19 were never written (10 of 30 rows, 1 of 6 chunks"),
    "compressed": (_compressed_with_gap, "features rows 24-29 were never written (6 of 30 rows, 2 of 8 chunks"),
    "contiguous": (_contiguous_no_storage, "features were never written (no storage allocated for its 30 rows"),
}


class TestRowsNeverWritten:
    @pytest.mark.parametrize("kind", UNWRITTEN)
    def test_refused_before_reading(self, tmp_path: Path, kind: str) -> None:
        build, fragment = UNWRITTEN[kind]
        refused(build(tmp_path / "s.h5"), "incomplete", fragment)

    @pytest.mark.parametrize("layout", [
        dict(chunks=(N, D)),                                  # one chunk holding everything
        dict(chunks=(64, D), maxshape=(None, D)),             # one chunk larger than the rows
        dict(chunks=(7, 4), compression="gzip", shuffle=True),  # compressed chunks are smaller, still written
        dict(chunks=(1, D), compression="lzf"),
        dict(),                                               # contiguous, written
        dict(chunks=(1, D), fillvalue=0.0),
    ])
    def test_fully_written_layouts_read_exactly(self, tmp_path: Path, layout: dict) -> None:
        f, c = sample()
        np.testing.assert_array_equal(read_slide(write(tmp_path / "s.h5", f, c, **layout)).features, f)

    def test_shrunk_dataset_reads(self, tmp_path: Path) -> None:
        f, c = sample()
        with h5py.File(tmp_path / "s.h5", "w") as h5:
            ds = h5.create_dataset("features", data=np.r_[f, f], chunks=(4, D), maxshape=(None, D))
            ds.resize(N, axis=0)
            h5.create_dataset("coords", data=np.r_[c, c], chunks=(4, 2), maxshape=(None, 2)).resize(N, axis=0)
        slide = read_slide(tmp_path / "s.h5")
        np.testing.assert_array_equal(slide.features, f)
        np.testing.assert_array_equal(slide.coords, c)


# --------------------------------------------------------------------------- 2. data kept outside the file
def _with_features(path: Path, make: Callable[[h5py.File], None]) -> Path:
    with h5py.File(path, "w") as h5:
        h5["coords"] = sample()[1]
        make(h5)
    return path


def _unlimited_virtual(h5: h5py.File, source: Path) -> None:
    """``features`` as a virtual dataset with an unlimited mapping: HDF5 opens ``source`` when it is opened."""
    space = h5s.create_simple((0, D), (h5s.UNLIMITED, D))
    space.select_hyperslab((0, 0), (h5s.UNLIMITED, 1), stride=(1, 1), block=(1, D))
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_virtual(space, str(source).encode(), b"features", space)
    h5d.create(h5.id, b"features", h5t.NATIVE_FLOAT, space, dcpl=dcpl).close()


class TestDataOutsideTheFile:
    @pytest.fixture
    def fifo(self, tmp_path: Path) -> Path:
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo"

    def test_soft_link(self, tmp_path: Path) -> None:
        path = _with_features(tmp_path / "s.h5", lambda h5: (h5.create_dataset("real", data=sample()[0]),
                                                             h5.__setitem__("features", h5py.SoftLink("/real"))))
        refused(path, "external_data", "'features' is a soft link to '/real'; slide files must store 'features' as "
                                       "a dataset of their own")

    def test_external_link_target_never_opened(self, tmp_path: Path, fifo: Path) -> None:
        path = _with_features(tmp_path / "s.h5", lambda h5: h5.__setitem__("features",
                                                                           h5py.ExternalLink(str(fifo), "/features")))
        refused_without_blocking(path, "external_data", f"'features' is an external link to '/features' in {fifo} "
                                                        "(not opened)")

    def test_external_link_for_coords(self, tmp_path: Path) -> None:
        write_slide_h5(tmp_path / "other.h5", *sample())
        with h5py.File(tmp_path / "s.h5", "w") as h5:
            h5["features"] = sample()[0]
            h5["coords"] = h5py.ExternalLink("other.h5", "/coords")
        refused(tmp_path / "s.h5", "external_data", "'coords' is an external link to '/coords' in other.h5")

    def test_virtual_dataset(self, tmp_path: Path, fifo: Path) -> None:
        def make(h5: h5py.File) -> None:
            layout = h5py.VirtualLayout(shape=(N, D), dtype="f4")
            layout[:] = h5py.VirtualSource(str(fifo), "features", shape=(N, D))
            h5.create_virtual_dataset("features", layout)

        path = _with_features(tmp_path / "s.h5", make)
        refused_without_blocking(path, "external_data", "'features' is a virtual dataset")

    def test_virtual_dataset_with_missing_sources(self, tmp_path: Path) -> None:
        def make(h5: h5py.File) -> None:   # HDF5 would read the missing source as fill values
            layout = h5py.VirtualLayout(shape=(N, D), dtype="f4")
            layout[:] = h5py.VirtualSource(str(tmp_path / "gone.h5"), "features", shape=(N, D))
            h5.create_virtual_dataset("features", layout)

        refused(_with_features(tmp_path / "s.h5", make), "external_data", "'features' is a virtual dataset")

    def test_unlimited_virtual_dataset_is_told_apart_before_it_is_opened(self, tmp_path: Path, fifo: Path) -> None:
        path = _with_features(tmp_path / "s.h5", lambda h5: _unlimited_virtual(h5, fifo))
        refused_without_blocking(path, "external_data", "'features' is a virtual dataset")

    def test_external_raw_storage(self, tmp_path: Path, fifo: Path) -> None:
        path = _with_features(tmp_path / "s.h5", lambda h5: h5.create_dataset(
            "features", shape=(N, D), dtype="f4", external=[(str(fifo), 0, h5py.h5f.UNLIMITED)]))
        refused_without_blocking(path, "external_data", f"'features' keeps its data in external raw file(s) {fifo} "
                                                        "(not opened)")

    @pytest.mark.parametrize("libver, userblock", [("earliest", 0), ("latest", 0), ("earliest", 512), ("latest", 1024)])
    def test_layout_read_from_the_object_header(self, tmp_path: Path, libver: str, userblock: int) -> None:
        with h5py.File(tmp_path / "s.h5", "w", libver=libver, userblock_size=userblock) as h5:
            h5.create_dataset("chunked", data=sample()[0], chunks=(1, D), maxshape=(None, D))
            h5.create_dataset("contiguous", data=sample()[0])
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_layout(h5d.COMPACT)
            h5d.create(h5.id, b"compact", h5t.NATIVE_FLOAT, h5s.create_simple((2, 2)), dcpl=dcpl).close()
            layout = h5py.VirtualLayout(shape=(N, D), dtype="f4")
            layout[:] = h5py.VirtualSource(".", "contiguous", shape=(N, D))
            h5.create_virtual_dataset("virtual", layout)
            for i in range(40):   # a long header (continuation blocks with the earliest format)
                h5["chunked"].attrs[f"a{i}"] = np.arange(16)
        with h5py.File(tmp_path / "s.h5", "r") as h5:
            names = ("chunked", "contiguous", "compact", "virtual")
            found = {name: _stored_layout(h5, h5o.get_info(h5.id, name.encode()).addr) for name in names}
            assert _stored_layout(h5, h5o.get_info(h5.id, b"/").addr) is None   # a group: no layout
        assert found == {"chunked": h5d.CHUNKED, "contiguous": h5d.CONTIGUOUS, "compact": h5d.COMPACT,
                         "virtual": h5d.VIRTUAL}

    @pytest.mark.parametrize("version", [1, 2])
    def test_layout_message_in_a_continuation_block(self, version: int) -> None:
        layout = bytes([3, h5d.VIRTUAL]) + bytes(6)   # layout message version 3: the class second
        if version == 1:   # prefix, a continuation message to 256; there a layout message
            continuation = struct.pack("<HHB3x", 0x10, 16, 0) + struct.pack("<QQ", 256, 8 + len(layout))
            header = struct.pack("<BBHII4x", 1, 0, 2, 1, len(continuation)) + continuation
            block = struct.pack("<HHB3x", 0x08, len(layout), 0) + layout
        else:              # "OHDR" chunk 0 (1-byte size), a continuation to an "OCHK" block at 256
            continuation = struct.pack("<BHB", 0x10, 16, 0) + struct.pack("<QQ", 256, 4 + 4 + len(layout) + 4)
            header = b"OHDR" + bytes([2, 0, len(continuation)]) + continuation + bytes(4)
            block = b"OCHK" + struct.pack("<BHB", 0x08, len(layout), 0) + layout + bytes(4)
        data = bytearray(512 + 512)
        data[512:512 + len(header)] = header
        data[512 + 256:512 + 256 + len(block)] = block
        assert _header_layout(io.BytesIO(bytes(data)), 512, 0, 8, 8) == h5d.VIRTUAL

    def test_old_layout_message_and_unknown_headers(self) -> None:
        old = bytes([1, 3, h5d.CHUNKED]) + bytes(5)   # layout message version 1: the class third
        header = struct.pack("<BBHII4x", 1, 0, 1, 1, 8 + len(old)) + struct.pack("<HHB3x", 0x08, len(old), 0) + old
        assert _header_layout(io.BytesIO(header), 0, 0, 8, 8) == h5d.CHUNKED
        assert _header_layout(io.BytesIO(b"\x07" + bytes(63)), 0, 0, 8, 8) is None
        with pytest.raises(EOFError):   # _stored_layout turns this into None: the dataset's own check decides
            _header_layout(io.BytesIO(header[:20]), 0, 0, 8, 8)


# --------------------------------------------------------------------------- 3. broken links
class TestBrokenLinks:
    @pytest.mark.parametrize("links, fragment", [
        ({"features": "/nowhere"}, "'features' is a soft link to '/nowhere', which does not exist (broken link)"),
        ({"features": "/a", "a": "/b", "b": "/features"}, "'features' is a soft link to '/a', which loops"),
        ({"features": "features"}, "which loops (broken link: more than 16 links)"),
        ({"features": "/grp/missing"}, "'features' is a soft link to '/grp/missing', which does not exist"),
        ({"features": "/coords/x"}, "'features' is a soft link to '/coords/x', which does not exist"),
        ({"features": "/grp/alias"}, "'features' is a soft link to '/grp/alias', which leads on to another file"),
        ({"features": "/grp/real"}, "'features' is a soft link to '/grp/real'; slide files must store"),
        ({"features": "grp/up", "grp/up": "/grp/real"}, "'features' is a soft link to 'grp/up'; slide files"),
    ])
    def test_soft_links(self, tmp_path: Path, links: dict[str, str], fragment: str) -> None:
        with h5py.File(tmp_path / "s.h5", "w") as h5:
            h5["coords"] = sample()[1]
            h5.create_group("grp").create_dataset("real", data=sample()[0])
            h5["grp/alias"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/features")
            for name, target in links.items():
                h5[name] = h5py.SoftLink(target)
        refused(tmp_path / "s.h5", "external_data", fragment)

    def test_dangling_external_link(self, tmp_path: Path) -> None:
        path = _with_features(tmp_path / "s.h5", lambda h5: h5.__setitem__("features",
                                                                           h5py.ExternalLink("gone.h5", "/features")))
        refused(path, "external_data", "'features' is an external link to '/features' in gone.h5 (not opened)")

    def test_the_runtime_loader_gets_the_slide_error(self, tmp_path: Path) -> None:
        from momkd.data.batch import load_graph_slide

        path = _with_features(tmp_path / "s.h5", lambda h5: h5.__setitem__("features", h5py.SoftLink("/nowhere")))
        with pytest.raises(SlideError, match="broken link"):
            load_graph_slide(path, k=4, direction="paper")

    def test_named_datatype_is_not_a_dataset(self, tmp_path: Path) -> None:
        path = _with_features(tmp_path / "s.h5", lambda h5: h5.__setitem__("features", np.dtype("f4")))
        refused(path, "missing_dataset", "'features' is a named datatype, not a dataset")


# --------------------------------------------------------------------------- 4. coords that are not whole pixels
class TestCoords:
    def test_whole_valued_float_coords_read_as_int64(self, tmp_path: Path) -> None:
        f, c = sample()
        for dtype in ("f8", "f4", "f2"):
            small = c // 256   # float16 holds whole numbers up to 2048 exactly
            slide = read_slide(write(tmp_path / "s.h5", f, (small if dtype == "f2" else c).astype(dtype)))
            assert slide.coords.dtype == np.int64
            np.testing.assert_array_equal(slide.coords, small if dtype == "f2" else c)

    @pytest.mark.parametrize("coords, fragment", [
        ({3: (100.5, 7.0)}, "coords are not whole pixels: row 3 = (100.5, 7.0) (1 of 30 rows; coords are level-0"),
        ({4: (1.0, -0.25), 9: (2.5, 2.0)}, "coords are not whole pixels: row 4 = (1.0, -0.25) (2 of 30 rows"),
        ({2: (3e12, 0.0)}, "coords are out of range: row 2 = (3000000000000.0, 0.0) (1 of 30 rows; beyond +-2**31"),
        ({5: (0.0, -1e300)}, "coords are out of range: row 5 = (0.0, -1e+300)"),
        ({6: (2.0**31 + 1, 0.5)}, "coords are out of range: row 6"),
    ])
    def test_float_coords_refused(self, tmp_path: Path, coords: dict[int, tuple[float, float]], fragment: str) -> None:
        f, c = sample()
        c = c.astype(np.float64)
        for row, value in coords.items():
            c[row] = value
        refused(write(tmp_path / "s.h5", f, c), "bad_coords", fragment, header=False)

    @pytest.mark.parametrize("dtype, value, fragment", [
        ("i8", 2**40, "coords are out of range: row 7 = (1099511627776, 0)"),
        ("i8", -(2**63), "coords are out of range: row 7 = (-9223372036854775808, 0)"),
        ("u8", 2**63 + 5, "coords are out of range: row 7 = (9223372036854775813, 0)"),
        ("u4", 2**31 + 1, "coords are out of range: row 7 = (2147483649, 0)"),
    ])
    def test_integer_coords_out_of_range_refused_before_casting(self, tmp_path: Path, dtype: str, value: int,
                                                                 fragment: str) -> None:
        f, _ = sample()
        c = np.zeros((N, 2), dtype=dtype)
        c[7, 0] = value
        refused(write(tmp_path / "s.h5", f, c), "bad_coords", fragment, header=False)

    def test_bound_itself_and_negative_coords_accepted(self, tmp_path: Path) -> None:
        f, c = sample()
        c[0], c[1] = (2**31, -(2**31)), (-256, 0)
        np.testing.assert_array_equal(read_slide(write(tmp_path / "s.h5", f, c)).coords, c)

    @pytest.mark.parametrize("make, fragment", [
        (lambda h5: h5.create_dataset("coords", data=np.zeros((N, 2), bool)), "coords have dtype bool, expected "
                                                                               "numbers"),
        (lambda h5: h5.create_dataset("coords", data=np.zeros((N, 2), "i1"),
                                      dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1")),
         "coords have dtype enum of int8, expected numbers"),
        (lambda h5: h5.create_dataset("coords", data=np.full((N, 2), b"12")), "coords have dtype |S2"),
    ])
    def test_bool_enum_and_string_coords_refused(self, tmp_path: Path, make: Callable, fragment: str) -> None:
        with h5py.File(tmp_path / "s.h5", "w") as h5:
            h5["features"] = sample()[0]
            make(h5)
        assert isinstance(refused(tmp_path / "s.h5", "bad_dtype", fragment), SlideDtypeError)


# --------------------------------------------------------------------------- 5. features that are not floats
def _float_type(fields: tuple[int, int, int, int, int], ebias: int, size: int = 2) -> h5t.TypeFloatID:
    """An HDF5 float type of ``size`` bytes with the given (sign, exponent, exponent bits, mantissa, mantissa
    bits) bit positions and exponent bias."""
    tid = h5t.IEEE_F32LE.copy()
    tid.set_fields(*fields)
    tid.set_size(size)
    tid.set_ebias(ebias)
    return tid


def _features_of_type(path: Path, tid: h5t.TypeFloatID, values: np.ndarray) -> Path:
    """A slide whose features are stored as ``tid``, converted by HDF5 from float32 ``values``."""
    with h5py.File(path, "w") as h5:
        h5["coords"] = sample()[1]
        ds = h5d.create(h5.id, b"features", tid, h5s.create_simple(values.shape))
        ds.write(h5s.ALL, h5s.ALL, np.ascontiguousarray(values, np.float32), mtype=h5t.NATIVE_FLOAT)
        ds.close()
    return path


class TestFeatureDtypes:
    @pytest.mark.parametrize("dtype", ["i1", "u1", "i4", "i8", "u8", "?"])
    def test_integer_and_bool_features_refused(self, tmp_path: Path, dtype: str) -> None:
        path = write(tmp_path / "s.h5", np.ones((N, D), dtype=dtype))
        name = "bool" if dtype == "?" else str(np.dtype(dtype))
        e = refused(path, "bad_dtype", f"features have dtype {name}, expected numbers stored as float16, float32, "
                                       "float64 or bfloat16")
        assert isinstance(e, SlideUnreadableError)   # a dtype problem is also a kind of unreadable

    def test_enum_and_complex_features_refused(self, tmp_path: Path) -> None:
        with h5py.File(tmp_path / "e.h5", "w") as h5:
            h5.create_dataset("features", data=np.zeros((N, D), "i1"), dtype=h5py.enum_dtype({"x": 0}, basetype="i1"))
            h5["coords"] = sample()[1]
        refused(tmp_path / "e.h5", "bad_dtype", "features have dtype enum of int8")
        refused(write(tmp_path / "c.h5", np.ones((N, D), np.complex64)), "bad_dtype", "features have dtype complex64")

    @pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", ">f4", ">f8"])
    def test_float_features_accepted(self, tmp_path: Path, dtype: str) -> None:
        f, _ = sample()
        slide = read_slide(write(tmp_path / "s.h5", f.astype(dtype), chunks=(1, D)))
        assert slide.features.dtype == np.float32
        np.testing.assert_array_equal(slide.features, f.astype(dtype).astype(np.float32))

    def test_bfloat16_features_read_exactly(self, tmp_path: Path) -> None:
        """bfloat16 values (here also far outside float16's range) come back bit-exact as float32."""
        f = sample()[0] * np.float32(1e30)
        f[0] = [1e-30, -3e38, 65536.0, 1.5, -0.0, 7.0]
        exact = (f.view(np.uint32) & 0xFFFF0000).view(np.float32)   # representable in bfloat16
        path = _features_of_type(tmp_path / "s.h5", _float_type((15, 7, 8, 0, 7), 127), exact)
        with h5py.File(path, "r") as h5:
            assert h5["features"].dtype == np.float32 and _read_row_chunks(h5["features"]) is None
        np.testing.assert_array_equal(read_slide(path).features, exact)

    def test_non_standard_float_refused(self, tmp_path: Path) -> None:
        path = _features_of_type(tmp_path / "s.h5", _float_type((15, 9, 6, 0, 9), 31), sample()[0])
        refused(path, "bad_dtype", "features have dtype non-standard 16-bit float (6 exponent and 9 mantissa bits, "
                                   "bias 31)")


# --------------------------------------------------------------------------- 6. files still being written
WRITER = "import sys, h5py\nf = h5py.File(sys.argv[1], 'a')\nprint('open', flush=True)\nsys.stdin.read()\n"
UNCLOSED = ("import os, sys, h5py, numpy as np\nf = h5py.File(sys.argv[1], 'w', libver='latest')\n"
            "f['features'] = np.ones((3, 4), 'f4')\nf['coords'] = np.zeros((3, 2), 'i8')\nf.flush()\nos._exit(0)\n")


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is off")
class TestBeingWritten:
    def test_file_held_open_by_a_writer(self, tmp_path: Path) -> None:
        """HDF5 shares one open file within a process, so the writer is another process."""
        path = write_slide_h5(tmp_path / "s.h5", *sample())
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
            refused(path, "being_written", "is open for writing by another program (still being written?); rerun "
                                           "when it is complete")
        finally:
            writer.communicate("", timeout=30)
        assert read_slide(path).n_patches == N   # once the writer has closed it

    def test_filesystem_without_locks_reads_unlocked(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """NFS without a lock daemon fails every lock with ENOLCK, which HDF5's best effort does not cover."""
        path, real, asked = write_slide_h5(tmp_path / "s.h5", *sample()), h5py.File, []

        def no_locks(name: Path, mode: str, locking: object = None) -> h5py.File:
            asked.append(locking)
            if locking is not False:
                raise OSError(errno.ENOLCK, "Unable to synchronously open file (unable to lock file, errno = 37, "
                                            "error message = 'No locks available')")
            return real(name, mode, locking=False)

        monkeypatch.setattr(h5py, "File", no_locks)
        assert read_slide(path).n_patches == N and asked == ["best-effort", False]

    def test_file_its_writer_never_closed(self, tmp_path: Path) -> None:
        path = tmp_path / "s.h5"
        subprocess.run([sys.executable, "-c", UNCLOSED, str(path)], check=True, timeout=60)
        refused(path, "being_written", "is marked as open for writing (still being written, or its writer stopped "
                                       "before closing it)")


# --------------------------------------------------------------------------- 7. filters this installation lacks
MADE_UP_FILTER = 511   # in HDF5's range for testing: registered by nothing


def _filtered(path: Path, flags: int, chunk_mask: int) -> Path:
    """``features`` whose pipeline holds the unregistered ``MADE_UP_FILTER`` (creation needs it optional); chunks
    written raw with ``chunk_mask`` (bit 0 set: the filter was skipped, so the bytes are the plain values)."""
    f, c = sample()
    with h5py.File(path, "w") as h5:
        h5["coords"] = c
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_chunk((10, D))
        dcpl.set_filter(MADE_UP_FILTER, flags, (3,))
        ds = h5d.create(h5.id, b"features", h5t.NATIVE_FLOAT, h5s.create_simple((N, D)), dcpl=dcpl)
        for row in range(0, N, 10):
            ds.write_direct_chunk((row, 0), f[row:row + 10].tobytes(), filter_mask=chunk_mask)
        ds.close()
    return path


class TestMissingFilters:
    def test_unavailable_filter_named(self, tmp_path: Path) -> None:
        assert not h5z.filter_avail(MADE_UP_FILTER)
        hint = "not in the installed hdf5plugin either" if _filter_plugins_loaded() else "pip install hdf5plugin"
        refused(_filtered(tmp_path / "s.h5", h5z.FLAG_OPTIONAL, 0), "missing_filter",
                f"features are compressed with HDF5 filter {MADE_UP_FILTER}, which this installation lacks ({hint})")

    def test_optional_filter_every_chunk_skipped_reads(self, tmp_path: Path) -> None:
        path = _filtered(tmp_path / "s.h5", h5z.FLAG_OPTIONAL, 1)
        np.testing.assert_array_equal(read_slide(path).features, sample()[0])

    def test_available_filters_read(self, tmp_path: Path) -> None:
        f, c = sample()
        path = write(tmp_path / "s.h5", f, c, chunks=(4, D), compression="gzip", shuffle=True, fletcher32=True)
        np.testing.assert_array_equal(read_slide(path).features, f)


# --------------------------------------------------------------------------- the direct chunk reader
class TestFastPath:
    @pytest.mark.parametrize("fmt", ["trident", "clam"])
    def test_features_and_coords_bit_identical(self, tmp_path: Path, fmt: str) -> None:
        f, c = sample(200, 16)
        path = write_slide_h5(tmp_path / "s.h5", f, c, fmt=fmt)
        with h5py.File(path, "r") as h5:
            for name in ("features", "coords"):
                direct = _read_row_chunks(h5[name])
                assert direct is not None and direct.dtype == h5[name].dtype
                np.testing.assert_array_equal(direct, h5[name][()])
        slide = read_slide(path)
        np.testing.assert_array_equal(slide.features, f)
        np.testing.assert_array_equal(slide.coords, c)

    @pytest.mark.parametrize("layout", ["one_row", "gzip", "rank1", "rank3", "partly_written", "shrunk",
                                        "appended", "random_order", "float16"])
    def test_btree_chunk_table_equals_hdf5s(self, tmp_path: Path, layout: str) -> None:
        """The chunk table read from the file's version 1 B-tree is HDF5's own, entry for entry."""
        rng = np.random.default_rng(1)
        path = tmp_path / f"{layout}.h5"
        with h5py.File(path, "w") as h5:
            if layout == "one_row":
                h5.create_dataset("x", data=rng.standard_normal((3000, 8), dtype=np.float32), chunks=(1, 8),
                                  maxshape=(None, 8))
            elif layout == "gzip":
                h5.create_dataset("x", data=rng.standard_normal((70, 6)), chunks=(7, 3), compression="gzip")
            elif layout == "rank1":
                h5.create_dataset("x", data=np.arange(1000), chunks=(3,))
            elif layout == "rank3":
                h5.create_dataset("x", data=np.ones((9, 8, 7)), chunks=(2, 3, 4))
            elif layout == "partly_written":
                d = h5.create_dataset("x", shape=(500, 4), dtype="f4", chunks=(1, 4), maxshape=(None, 4))
                d[:200], d[300:350] = 1, 2
            elif layout == "shrunk":
                d = h5.create_dataset("x", data=np.ones((2000, 4)), chunks=(1, 4), maxshape=(None, 4))
                d.resize((1200, 4))
            elif layout == "appended":
                d = h5.create_dataset("x", shape=(0, 4), dtype="f4", chunks=(1, 4), maxshape=(None, 4))
                for i in range(0, 1500, 37):
                    d.resize((i + 37, 4))
                    d[i:i + 37] = i
            elif layout == "random_order":
                d = h5.create_dataset("x", shape=(800, 4), dtype="f4", chunks=(1, 4))
                for i in rng.permutation(800):
                    d[i] = i
            else:
                h5.create_dataset("x", data=np.ones((300, 4), "f2"), chunks=(1, 4))
        with h5py.File(path, "r") as h5:
            fast, hdf5 = _btree_chunks(h5["x"]), _chunk_table(h5["x"].id)
        assert fast is not None
        for field in ("offsets", "addresses", "sizes", "filter_masks"):
            np.testing.assert_array_equal(getattr(fast, field), getattr(hdf5, field))
            assert getattr(fast, field).dtype == np.int64

    def test_newer_chunk_indexes_are_left_to_hdf5(self, tmp_path: Path) -> None:
        path = tmp_path / "latest.h5"
        with h5py.File(path, "w", libver="latest") as h5:
            h5.create_dataset("x", data=np.ones((300, 4)), chunks=(1, 4), maxshape=(None, 4))
        with h5py.File(path, "r") as h5:
            assert _btree_chunks(h5["x"]) is None
            assert len(_dataset_chunks(h5["x"]).addresses) == 300

    def test_a_btree_read_that_hdf5_disagrees_with_is_not_used(self, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
        import momkd.data.slide as slide_module

        path = write_slide_h5(tmp_path / "s.h5", *sample(200, 16))
        with h5py.File(path, "r") as h5:
            good = _btree_chunks(h5["features"])
            assert good is not None
            shifted = type(good)(good.offsets, good.addresses + 16, good.sizes, good.filter_masks)
            monkeypatch.setattr(slide_module, "_btree_chunks", lambda ds: shifted)
            np.testing.assert_array_equal(_dataset_chunks(h5["features"]).addresses, good.addresses)

    def test_a_chunk_recorded_with_another_size_is_refused(self, tmp_path: Path) -> None:
        """An unfiltered chunk is stored whole; a chunk index entry with another size is corrupt (HDF5 would
        read bytes that are not the row), never read as data."""
        f, c = sample(50, 16)
        path = write_slide_h5(tmp_path / "s.h5", f, c)
        with h5py.File(path, "r") as h5:
            info = h5["features"].id.get_chunk_info_by_coord((7, 0))
        # the B-tree key of row 7: chunk bytes (u4), filter mask (u4), offsets (u8 x 3), then the child address
        key = struct.pack("<IIQQQQ", 16 * 4, 0, 7, 0, 0, info.byte_offset)
        data = path.read_bytes()
        assert data.count(key) == 1
        path.write_bytes(data.replace(key, struct.pack("<IIQQQQ", 16 * 4 - 4, 0, 7, 0, 0, info.byte_offset)))
        e = refused(path, "unreadable", "features: the chunk of row 7 is recorded as 60 bytes, not 64", header=False)
        assert "corrupt file" in e.message

    def test_chunk_table_without_chunk_iter(self, tmp_path: Path) -> None:
        """With an HDF5 older than 1.12.3 (no ``chunk_iter``) the table comes from ``get_chunk_info``."""

        class OldDatasetID:
            def __init__(self, dsid: h5d.DatasetID) -> None:
                self.rank, self.get_num_chunks = dsid.rank, dsid.get_num_chunks
                self.get_chunk_info = dsid.get_chunk_info

        path = write(tmp_path / "s.h5", chunks=(7, 3), compression="gzip")
        with h5py.File(path, "r") as h5:
            new, old = _chunk_table(h5["features"].id), _chunk_table(OldDatasetID(h5["features"].id))
        assert new.offsets.shape == (10, 2)
        for field in ("offsets", "addresses", "sizes", "filter_masks"):
            np.testing.assert_array_equal(getattr(new, field), getattr(old, field))
