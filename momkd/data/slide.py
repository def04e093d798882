"""Slide feature files: TRIDENT and CLAM ``.h5`` -> ``Slide`` (features float32 (N, D), coords int64 (N, 2)).

Both formats hold a ``features`` dataset (N, D) and a ``coords`` dataset (N, 2) of level-0 top-left patch
corners. TRIDENT writes float32/float16 features, int64 coords, one-row chunks and attributes
(``patch_size_level0``, ``target_magnification``, ``level0_magnification``, ``patch_size`` on ``coords``;
``encoder`` on ``features``); CLAM writes float32 features, int32 coords and no attributes. Every problem
with a file is one ``SlideError`` subclass with a one-line message (see ``momkd.errors``). Files are only read.

Only data really in the file is accepted, and every check but the values' is made before any data is read:
``features`` and ``coords`` must be datasets stored under their own names (no soft or external link, virtual
dataset or external raw storage, none of which is ever followed), compressed only with filters this installation
has, with every row written (no unallocated chunk or storage that HDF5 would read back as fill values), features
of a float type and coords of whole level-0 pixels. A file another program holds open for writing (HDF5 file
locking, best effort) or that its writer never closed is refused as still being written.
"""

from __future__ import annotations

import errno
import functools
import importlib
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
from h5py import h5d, h5g, h5l, h5o, h5t, h5z

from momkd.errors import (
    SlideBeingWrittenError,
    SlideCoordsError,
    SlideDtypeError,
    SlideEmptyError,
    SlideError,
    SlideExternalDataError,
    SlideFeatureDimError,
    SlideFilterError,
    SlideIncompleteError,
    SlideMissingDatasetError,
    SlideNonFiniteError,
    SlideRowMismatchError,
    SlideShapeError,
    SlideUnreadableError,
)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The HDF5 superblock sits at 0 or, after a user block, at 512 * 2**k.
_SIGNATURE_OFFSETS = (0,) + tuple(512 << k for k in range(16))
COORD_LIMIT = 2**31      # |coordinate| bound in level-0 pixels: far above any slide's size, far inside int64
MAX_LINK_HOPS = 16       # soft links followed when telling where one leads (HDF5's own traversal limit)
FEATURE_FLOATS = "float16, float32, float64 or bfloat16"
# Feature float types accepted, by HDF5 layout: (bytes, (sign, exponent, exponent bits, mantissa, mantissa bits)
# bit positions, exponent bias), either byte order. h5py hands bfloat16 out as float32 (an exact widening).
_FEATURE_FLOAT_LAYOUTS = {
    (2, (15, 10, 5, 0, 10), 15): "float16",
    (4, (31, 23, 8, 0, 23), 127): "float32",
    (8, (63, 52, 11, 0, 52), 1023): "float64",
    (2, (15, 7, 8, 0, 7), 127): "bfloat16",
}
_OBJECT_KINDS = {h5o.TYPE_GROUP: "group", h5o.TYPE_NAMED_DATATYPE: "named datatype"}
_LAYOUT_MESSAGE, _CONTINUATION_MESSAGE = 0x08, 0x10   # object header message types (HDF5 file format spec)


@dataclass(frozen=True)
class SlideAttrs:
    """What the feature extractor recorded about the patches (``None`` when the file does not say)."""

    patch_size_level0: int | None = None   # patch side in level-0 pixels
    encoder: str | None = None             # patch encoder name
    magnification: float | None = None     # magnification the patches were extracted at


@dataclass(frozen=True, eq=False)
class Slide:
    """One slide's patch features.

    Attributes:
        slide_id: the file stem.
        path: the ``.h5`` file.
        features: (N, D) float32, C-contiguous, all finite, N >= 1.
        coords: (N, 2) int64 level-0 top-left (x, y) of each patch.
        attrs: extraction metadata.
    """

    slide_id: str
    path: Path
    features: np.ndarray
    coords: np.ndarray
    attrs: SlideAttrs

    @property
    def n_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def read_slide(path: str | os.PathLike[str], expected_dim: int | None = None) -> Slide:
    """Read and check a TRIDENT or CLAM feature file.

    Args:
        path: the ``.h5`` file; its stem is the slide id.
        expected_dim: the feature dimension D the caller needs (``None``: any).

    Returns:
        ``Slide`` with features (N, D) float32 C-contiguous and coords (N, 2) int64.

    Raises:
        SlideError subclass: ``unreadable``, ``being_written``, ``missing_dataset``, ``external_data``,
        ``bad_shape``, ``row_mismatch``, ``empty``, ``feature_dim``, ``bad_dtype``, ``missing_filter``,
        ``incomplete``, then (values) ``non_finite`` or ``bad_coords``; all but the value checks are made before
        any data is read.
    """
    path = Path(path)
    with _open(path) as h5:
        features_ds, coords_ds = _datasets(path, h5, expected_dim)
        attrs = _attrs(h5, features_ds, coords_ds)
        features = _read_features(features_ds)
        raw_coords = _read_row_chunks(coords_ds)
        if raw_coords is None:
            raw_coords = coords_ds[()]
    coords = _pixel_coords(path, raw_coords)
    bad_rows = nonfinite_rows(features)
    if bad_rows.size:
        raise SlideNonFiniteError(
            path, f"features contain NaN or Inf in {bad_rows.size} of {len(features)} rows (first at row {bad_rows[0]})"
        )
    return Slide(slide_id=path.stem, path=path, features=features, coords=coords, attrs=attrs)


def read_slide_header(path: str | os.PathLike[str]) -> tuple[int, int, SlideAttrs]:
    """Check a feature file's layout without reading its features.

    Returns:
        (n_patches N, feature_dim D, attrs). Values are not checked (NaN/Inf and whole-pixel coords need
        ``read_slide``).

    Raises:
        SlideError subclass for every problem ``read_slide`` finds before reading data.
    """
    path = Path(path)
    with _open(path) as h5:
        features_ds, coords_ds = _datasets(path, h5, None)
        return int(features_ds.shape[0]), int(features_ds.shape[1]), _attrs(h5, features_ds, coords_ds)


def nonfinite_rows(features: np.ndarray) -> np.ndarray:
    """Row indices (ascending, int64) of a 2-D float array that hold a NaN or an Inf.

    A row with a NaN or Inf always has a non-finite sum, so one fast reduction finds every candidate; only
    the candidates (rows whose finite values overflowed the sum, or truly bad rows) are checked exactly.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        suspects = np.flatnonzero(~np.isfinite(features.sum(axis=1)))
    if suspects.size:
        suspects = suspects[~np.isfinite(features[suspects]).all(axis=1)]
    return suspects


@contextmanager
def _open(path: Path) -> Iterator[h5py.File]:
    """Open ``path`` read-only; every OS/HDF5 failure (also while reading inside the block) is unreadable."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SlideUnreadableError(path, "file not found") from None
    except OSError as e:
        raise SlideUnreadableError(path, f"cannot access the file: {e.strerror or e}") from None
    if path.is_dir():
        raise SlideUnreadableError(path, "is a folder, not a feature file")
    if size == 0:
        raise SlideUnreadableError(path, "empty file (0 bytes)")
    try:
        h5 = _open_locked(path)
    except OSError as e:
        raise _open_error(path, size, e) from None
    try:
        with h5:
            yield h5
    except OSError as e:
        raise SlideUnreadableError(path, f"corrupt or truncated data ({_h5_reason(e)})") from None


def _open_locked(path: Path) -> h5py.File:
    """``path`` opened read-only under a shared HDF5 file lock, which fails while a writer holds the file. Where the
    filesystem cannot lock at all (HDF5's best effort covers ENOSYS; NFS without a lock daemon says ENOLCK) the file
    is opened without a lock, as HDF5 does when file locking is switched off."""
    try:
        return h5py.File(path, "r", locking="best-effort")
    except OSError as e:
        if not _lock_failed(e) or _lock_errno(e) in _LOCK_HELD_ERRNOS:
            raise
    return h5py.File(path, "r", locking=False)


_LOCK_HELD_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}   # flock / fcntl: another process holds it


def _lock_failed(error: OSError) -> bool:
    return "unable to lock file" in str(error)


def _lock_errno(error: OSError) -> int | None:
    """The errno of HDF5's failed lock call (h5py sets it on the exception, and HDF5 writes it in the message)."""
    found = re.search(r"errno = (\d+)", str(error))
    return error.errno or (int(found.group(1)) if found else None)


def _open_error(path: Path, size: int, error: OSError) -> SlideError:
    text = str(error)
    if _lock_failed(error):
        return SlideBeingWrittenError(path, "is open for writing by another program (still being written?); "
                                            "rerun when it is complete")
    if "already open for write" in text:   # a writer's consistency flags (SWMR / latest format) never cleared
        return SlideBeingWrittenError(path, "is marked as open for writing (still being written, or its writer "
                                            "stopped before closing it); rerun when it is complete")
    if isinstance(error, PermissionError) or error.errno == errno.EACCES:
        return SlideUnreadableError(path, "permission denied")
    if not _has_hdf5_signature(path, size):
        return SlideUnreadableError(path, f"not an HDF5 file ({size} bytes, no HDF5 signature)")
    return SlideUnreadableError(path, f"truncated or corrupt HDF5 file ({size} bytes: {_h5_reason(error)})")


def _has_hdf5_signature(path: Path, size: int) -> bool:
    try:
        with path.open("rb") as f:
            for offset in _SIGNATURE_OFFSETS:
                if offset + len(HDF5_SIGNATURE) > size:
                    return False
                f.seek(offset)
                if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def _h5_reason(error: OSError) -> str:
    """The useful part of an h5py error on one line, e.g. ``truncated file: eof = 10, stored_eof = 20``."""
    text = " ".join(str(error).split())
    inner = re.search(r"\((.+)\)\s*$", text)
    return inner.group(1) if inner else text


def _datasets(path: Path, h5: h5py.File, expected_dim: int | None) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The ``features`` and ``coords`` datasets after every check that needs no data read."""
    found = sorted(h5.keys())
    for name in ("features", "coords"):
        if name not in h5:
            raise SlideMissingDatasetError(path, f"no '{name}' dataset (found: {', '.join(found) or 'nothing'})")
        _check_in_file(path, h5, name)
    features, coords = h5["features"], h5["coords"]
    f_shape, c_shape = tuple(features.shape or ()), tuple(coords.shape or ())
    if len(f_shape) >= 1 and len(c_shape) >= 1 and f_shape[0] == 0 and c_shape[0] == 0:
        raise SlideEmptyError(path, "no patches (N = 0): no tissue was found on this slide")
    if len(f_shape) != 2:
        raise SlideShapeError(path, f"features have shape {f_shape}, expected (N, D)")
    if len(c_shape) != 2 or c_shape[1] != 2:
        raise SlideShapeError(path, f"coords have shape {c_shape}, expected (N, 2)")
    if f_shape[0] != c_shape[0]:
        raise SlideRowMismatchError(path, f"features have {f_shape[0]} rows but coords have {c_shape[0]}")
    if f_shape[1] == 0:
        raise SlideShapeError(path, f"features have shape {f_shape}: zero columns")
    if expected_dim is not None and f_shape[1] != expected_dim:
        raise SlideFeatureDimError(path, f"feature dim {f_shape[1]} does not match the expected {expected_dim} "
                                         f"(features from another encoder?)")
    if _float_name(features.id.get_type()) is None:
        raise SlideDtypeError(path, f"features have dtype {_describe_type(features)}, expected numbers stored as "
                                    f"{FEATURE_FLOATS}")
    if coords.id.get_type().get_class() not in (h5t.INTEGER, h5t.FLOAT):
        raise SlideDtypeError(path, f"coords have dtype {_describe_type(coords)}, expected numbers (integer or "
                                    f"whole-valued float level-0 pixel positions)")
    for name, ds in (("features", features), ("coords", coords)):
        _check_storage(path, name, ds)
    return features, coords


def _check_in_file(path: Path, h5: h5py.File, name: str) -> None:
    """Refuse ``name`` unless it is a dataset stored in this file under that name: a hard link (soft and external
    links are described, never followed out of the file) to a dataset that is not virtual (told from its object
    header, since opening a virtual dataset with an unlimited mapping opens its source files)."""
    key = name.encode()
    link = h5.id.links.get_info(key)
    kind = link.type
    rule = f"slide files must store '{name}' as a dataset of their own"
    if kind == h5l.TYPE_SOFT:
        target = h5.id.links.get_val(key).decode("utf-8", "replace")
        raise SlideExternalDataError(path, f"'{name}' is a soft link to '{target}'{_soft_link_end(h5, target)}; "
                                           f"{rule}")
    if kind == h5l.TYPE_EXTERNAL:
        file, obj = (part.decode("utf-8", "replace") for part in h5.id.links.get_val(key))
        raise SlideExternalDataError(path, f"'{name}' is an external link to '{obj}' in {file} (not opened); {rule}")
    if kind != h5l.TYPE_HARD:
        raise SlideExternalDataError(path, f"'{name}' is a user-defined HDF5 link (link type {kind}); {rule}")
    layout = _stored_layout(h5, link.u)   # a hard link's ``u``: the object header's address
    if layout == h5d.VIRTUAL:
        raise SlideExternalDataError(path, _virtual_message(name))
    if layout is None:   # no layout found: not a dataset, or a header this reader does not know
        object_type = h5o.get_info(h5.id, key).type
        if object_type != h5o.TYPE_DATASET:
            what = _OBJECT_KINDS.get(object_type, "non-dataset object")
            raise SlideMissingDatasetError(path, f"'{name}' is a {what}, not a dataset")


def _virtual_message(name: str) -> str:
    return (f"'{name}' is a virtual dataset (its data lives in other datasets or files, not opened); slide files "
            f"must store '{name}' as a dataset of their own")


def _soft_link_end(h5: h5py.File, target: str) -> str:
    """Where a soft link from the root group to ``target`` leads, followed one link at a time without leaving the
    file or opening a dataset: ``""`` for an object in the file, else why the link is broken or leaves the file."""
    pending = [part for part in target.split("/") if part not in ("", ".")]
    groups: list[str] = []   # hard-linked groups from the root down to the one ``pending[0]`` is looked up in
    hops = 1
    while pending:
        part = pending.pop(0)
        group, key = h5g.open(h5.id, ("/" + "/".join(groups)).encode()), part.encode()
        if not group.links.exists(key):
            return ", which does not exist (broken link)"
        kind = group.links.get_info(key).type
        if kind == h5l.TYPE_HARD:
            if pending and h5o.get_info(group, key).type != h5o.TYPE_GROUP:
                return ", which does not exist (broken link)"
            groups.append(part)
        elif kind == h5l.TYPE_SOFT:
            hops += 1
            if hops > MAX_LINK_HOPS:
                return f", which loops (broken link: more than {MAX_LINK_HOPS} links)"
            hop = group.links.get_val(key).decode("utf-8", "replace")
            groups = [] if hop.startswith("/") else groups
            pending = [p for p in hop.split("/") if p not in ("", ".")] + pending
        elif kind == h5l.TYPE_EXTERNAL:
            return ", which leads on to another file"
        else:
            return ", which ends in a user-defined link"
    return ""


def _stored_layout(h5: h5py.File, address: int) -> int | None:
    """The layout class (``h5d.COMPACT``, ``CONTIGUOUS``, ``CHUNKED`` or ``VIRTUAL``) recorded in the object header
    at ``address``, read from the file's bytes without opening the object; ``None`` for a header without one (not
    a dataset) or one this reader does not know (a dataset's own ``is_virtual`` is then checked once it is open)."""
    try:
        sizeof_address, sizeof_size = h5.id.get_create_plist().get_sizes()
        with open(h5.filename, "rb") as f:
            return _header_layout(f, h5.userblock_size, int(address), sizeof_address, sizeof_size)
    except (OSError, ValueError, TypeError, IndexError, EOFError):
        return None


def _header_layout(f: BinaryIO, base: int, address: int, sizeof_address: int, sizeof_size: int) -> int | None:
    """The layout class in the Data Layout message of the version 1 or 2 object header at ``address`` (relative
    to ``base``, the user block size); ``None`` without one."""
    body = _layout_message(f, base, address, sizeof_address, sizeof_size)
    if body is None:
        return None
    return body[1] if body[0] >= 3 else body[2]   # layout message versions 1-2 put the class third


def _layout_message(f: BinaryIO, base: int, address: int, sizeof_address: int, sizeof_size: int) -> bytes | None:
    """The body (at least 3 bytes) of the Data Layout message of the version 1 or 2 object header at ``address``
    (relative to ``base``), following continuation blocks (HDF5 file format specification, IV.A); ``None`` for a
    header without one or of another version."""

    def read(at: int, size: int) -> bytes:
        if not 0 <= size <= 1 << 24:   # real header blocks are far smaller: this one is corrupt
            raise ValueError(f"object header block of {size} bytes")
        f.seek(base + at)
        data = f.read(size)
        if len(data) != size:
            raise EOFError(f"object header at {at} runs past the end of the file")
        return data

    def number(data: bytes) -> int:
        return int.from_bytes(data, "little")

    prefix = read(address, 16)
    if prefix[:5] == b"OHDR\x02":
        version, flags = 2, prefix[5]
        at = address + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)   # times, attribute phases
        width = 1 << (flags & 0x03)
        blocks = [(at + width, number(read(at, width)))]
        head = 6 if flags & 0x04 else 4   # message type (1), size (2), flags (1)[, creation order (2)]
    elif prefix[0] == 1:
        version, blocks, head = 1, [(address + 16, number(prefix[8:12]))], 8   # type (2), size (2), flags, reserved
    else:
        return None
    for at, size in blocks:   # grows as continuation messages are met
        if len(blocks) > 64:  # a corrupt header must not send this round in circles
            return None
        data = read(at, size)
        pos = 0
        while pos + head <= len(data):
            if version == 2:
                kind, length = data[pos], number(data[pos + 1:pos + 3])
            else:
                kind, length = number(data[pos:pos + 2]), number(data[pos + 2:pos + 4])
            body = data[pos + head:pos + head + length]
            if kind == _LAYOUT_MESSAGE and len(body) >= 3:
                return body
            if kind == _CONTINUATION_MESSAGE and len(body) >= sizeof_address + sizeof_size:
                where, extent = number(body[:sizeof_address]), number(body[sizeof_address:sizeof_address + sizeof_size])
                if version == 1:
                    blocks.append((where, extent))
                elif read(where, 4) == b"OCHK":
                    blocks.append((where + 4, extent - 8))   # after the signature, before the checksum
                else:
                    return None
            pos += head + length
    return None


def _float_name(tid: Any) -> str | None:
    """The name of an HDF5 float type that features may have (``FEATURE_FLOATS``), else ``None``."""
    if (tid.get_class() != h5t.FLOAT or tid.get_norm() != h5t.NORM_IMPLIED or tid.get_offset()
            or tid.get_precision() != 8 * tid.get_size()):
        return None
    return _FEATURE_FLOAT_LAYOUTS.get((tid.get_size(), tuple(tid.get_fields()), tid.get_ebias()))


def _describe_type(ds: h5py.Dataset) -> str:
    tid = ds.id.get_type()
    if ds.dtype == np.bool_:
        return "bool"
    if tid.get_class() == h5t.ENUM:
        return f"enum of {ds.dtype}"
    if tid.get_class() == h5t.FLOAT and _float_name(tid) is None:
        _, _, exponent_bits, _, mantissa_bits = tid.get_fields()
        return (f"non-standard {8 * tid.get_size()}-bit float ({exponent_bits} exponent and {mantissa_bits} "
                f"mantissa bits, bias {tid.get_ebias()})")
    return str(ds.dtype)


def _check_storage(path: Path, name: str, ds: h5py.Dataset) -> None:
    """Refuse data kept outside the file, compressed with a filter this installation lacks, or never written."""
    dcpl = ds.id.get_create_plist()
    if ds.is_virtual:
        raise SlideExternalDataError(path, _virtual_message(name))
    if dcpl.get_external_count():
        files = [dcpl.get_external(i)[0].decode("utf-8", "replace") for i in range(dcpl.get_external_count())]
        raise SlideExternalDataError(path, f"'{name}' keeps its data in external raw file(s) {', '.join(files)} (not "
                                           f"opened); slide files must store '{name}' as a dataset of their own")
    for index in range(dcpl.get_nfilters()):
        code, flags, _, label = dcpl.get_filter(index)
        if h5z.filter_avail(code) or (_filter_plugins_loaded() and h5z.filter_avail(code)):
            continue
        if flags & h5z.FLAG_OPTIONAL and np.all(_dataset_chunks(ds).filter_masks >> index & 1):
            continue   # an optional filter that every chunk was stored without
        label = label.decode("utf-8", "replace").strip()
        hint = "not in the installed hdf5plugin either" if _filter_plugins_loaded() else "pip install hdf5plugin"
        raise SlideFilterError(path, f"{name} are compressed with HDF5 filter {code}{f' ({label})' if label else ''}"
                                     f", which this installation lacks ({hint})")
    _check_written(path, name, ds)


@functools.cache
def _filter_plugins_loaded() -> bool:
    """Import ``hdf5plugin`` (importing it registers the common compression filters with HDF5) if installed."""
    try:
        importlib.import_module("hdf5plugin")
    except ImportError:
        return False
    return True


def _check_written(path: Path, name: str, ds: h5py.Dataset) -> None:
    """Refuse a dataset with rows never written, which HDF5 would read back as fill values: a chunk covering rows
    [0, N) that is not allocated (a resized or pre-sized dataset from an interrupted writer), or contiguous
    storage never allocated. Compressed chunks count as written whatever their size."""
    n = int(ds.shape[0])
    if ds.chunks is None:
        if ds.id.get_create_plist().get_layout() == h5d.CONTIGUOUS and ds.id.get_offset() is None:
            raise SlideIncompleteError(path, f"{name} were never written (no storage allocated for its {n} rows; "
                                             f"file from an interrupted writer?)")
        return
    grid = tuple(-(-int(size) // int(chunk)) for size, chunk in zip(ds.shape, ds.chunks))
    total = math.prod(grid)
    if ds.id.get_num_chunks() == total:   # HDF5 drops chunks outside the extent: this many means every one is there
        return
    offsets = _dataset_chunks(ds).offsets
    present = np.zeros(grid, dtype=bool)
    inside = (offsets < np.asarray(ds.shape)).all(axis=1)
    present[tuple((offsets[inside] // np.asarray(ds.chunks)).T)] = True
    if present.all():
        return
    row_missing = np.repeat(~present.reshape(grid[0], -1).all(axis=1), ds.chunks[0])[:n]
    rows = np.flatnonzero(row_missing)
    raise SlideIncompleteError(path, f"{name} rows {_row_ranges(rows)} were never written ({rows.size} of {n} rows, "
                                     f"{int((~present).sum())} of {total} chunks; file from an interrupted writer?)")


def _row_ranges(rows: np.ndarray, shown: int = 3) -> str:
    """Ascending row indices as ranges: ``"5, 10-19 and 2 more ranges"``."""
    spans = [(int(run[0]), int(run[-1])) for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)]
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans[:shown])
    return text + (f" and {len(spans) - shown} more ranges" if len(spans) > shown else "")


def _pixel_coords(path: Path, raw: np.ndarray) -> np.ndarray:
    """(N, 2) int64 level-0 pixel positions from the stored (N, 2) coords of any integer or float dtype: values
    that are not whole pixels are refused, not truncated, and values beyond +-``COORD_LIMIT``, not overflowed."""
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).any(axis=1).sum())
        raise SlideNonFiniteError(path, f"coords contain NaN or Inf in {bad} of {len(raw)} rows")
    limits = np.iinfo(raw.dtype) if raw.dtype.kind in "iu" else np.finfo(raw.dtype)
    if not -COORD_LIMIT <= float(limits.min) <= float(limits.max) <= COORD_LIMIT:   # else none can be out of range
        _refuse_coord_rows(path, np.flatnonzero(((raw > COORD_LIMIT) | (raw < -COORD_LIMIT)).any(axis=1)), raw,
                           "coords are out of range", "beyond +-2**31 level-0 pixels")
    if raw.dtype.kind == "f":
        _refuse_coord_rows(path, np.flatnonzero((raw != np.floor(raw)).any(axis=1)), raw, "coords are not whole pixels",
                           "coords are level-0 pixel positions")
    return np.ascontiguousarray(raw, dtype=np.int64)


def _refuse_coord_rows(path: Path, rows: np.ndarray, raw: np.ndarray, problem: str, why: str) -> None:
    """Raise ``SlideCoordsError`` naming the first of ``rows`` (ascending indices into ``raw``) when there is one."""
    if rows.size:
        first = rows[0]
        raise SlideCoordsError(path, f"{problem}: row {first} = ({', '.join(str(v) for v in raw[first])}) "
                                     f"({rows.size} of {len(raw)} rows; {why})")


def _read_features(ds: h5py.Dataset) -> np.ndarray:
    """The whole dataset as (N, D) float32 C-contiguous."""
    raw = _read_row_chunks(ds)
    if raw is None:
        if ds.dtype == np.float32:
            raw = np.empty(ds.shape, dtype=np.float32)
            ds.read_direct(raw)
        else:   # numpy's cast is faster than HDF5's type conversion (fp16 -> fp32 measured 2x)
            raw = ds[()]
    return np.ascontiguousarray(raw, dtype=np.float32)


def _read_row_chunks(ds: h5py.Dataset) -> np.ndarray | None:
    """The (N, C) dataset in its own dtype read straight from the file's chunks, or ``None`` when its layout is
    not the simple one.

    TRIDENT and CLAM store features and coords in one-row chunks; a plain HDF5 read then spends most of its time
    on per-chunk overhead. When every chunk holds whole rows, is allocated, unfiltered and stored in exactly the
    bytes of ``ds.dtype`` (not, e.g., bfloat16 that h5py hands out as float32), and the file is a plain one
    (default driver, no user block), the chunk addresses are collected once and each run of adjacent chunks is
    read with one system call: about 2x faster than ``ds[()]`` for the features of a 20000 x 1536 slide, 2-3x for
    its coords. Only ever called on datasets ``_datasets`` accepted. Raises ``SlideUnreadableError`` for a chunk
    recorded with another size than an unfiltered chunk has (a corrupt chunk index).
    """
    n, d = ds.shape
    h5 = ds.file
    if (ds.chunks is None or ds.chunks[1] != d or h5.driver != "sec2" or h5.userblock_size
            or ds.id.get_create_plist().get_nfilters() or not ds.id.get_type().equal(h5t.py_create(ds.dtype))):
        return None
    rows = ds.chunks[0]
    n_chunks = -(-n // rows)
    chunk_bytes = rows * d * ds.dtype.itemsize
    table = _dataset_chunks(ds)
    inside = table.offsets[:, 0] < n
    addresses = np.full(n_chunks, -1, dtype=np.int64)
    addresses[table.offsets[inside, 0] // rows] = table.addresses[inside]
    sizes = table.sizes[inside]
    odd = np.flatnonzero(sizes != chunk_bytes)
    if odd.size:   # unfiltered chunks are stored whole: another size is a corrupt chunk index (HDF5 reads garbage)
        raise SlideUnreadableError(Path(h5.filename), f"{ds.name.lstrip('/')}: the chunk of row "
                                   f"{int(table.offsets[inside][odd[0], 0])} is recorded as {int(sizes[odd[0]])} "
                                   f"bytes, not {chunk_bytes} ({odd.size} such chunk(s); corrupt file)")
    if (addresses < 0).any():   # a chunk missing: HDF5's own read (``_check_written`` has refused rows never written)
        return None
    out = np.empty((n, d), dtype=ds.dtype)
    buffer = out.reshape(-1).view(np.uint8).data   # a memoryview of out's bytes
    breaks = np.flatnonzero(np.diff(addresses) != chunk_bytes) + 1
    with open(h5.filename, "rb", buffering=0) as f:
        for first, end in zip(np.r_[0, breaks], np.r_[breaks, n_chunks]):
            begin, stop = first * chunk_bytes, min(end * chunk_bytes, len(buffer))
            if not _read_exact(f, int(addresses[first]), buffer[begin:stop]):
                return None   # shorter than HDF5 says: HDF5's own read reports the problem
    return out


@dataclass(frozen=True)
class _Chunks:
    """The K allocated chunks of a chunked dataset, in the order of HDF5's chunk index."""

    offsets: np.ndarray        # (K, rank) int64: each chunk's first element
    addresses: np.ndarray      # (K,) int64: byte offset in the file
    sizes: np.ndarray          # (K,) int64: stored bytes (smaller than the chunk when compressed)
    filter_masks: np.ndarray   # (K,) int64: bit i set when filter i was skipped for that chunk


def _dataset_chunks(ds: h5py.Dataset) -> _Chunks:
    """Every allocated chunk of the chunked dataset ``ds``: from its version 1 B-tree when it has one
    (:func:`_btree_chunks`) and HDF5 agrees with what was read (:func:`_agrees_with_hdf5`), else from HDF5
    (:func:`_chunk_table`)."""
    table = _btree_chunks(ds)
    return table if table is not None and _agrees_with_hdf5(ds, table) else _chunk_table(ds.id)


def _agrees_with_hdf5(ds: h5py.Dataset, table: _Chunks) -> bool:
    """HDF5 counts as many chunks as ``table`` and records the first, middle and last of them as it does
    (``get_chunk_info_by_coord``): a cheap check that the B-tree was read the way HDF5 reads it."""
    dsid = ds.id
    count = len(table.addresses)
    if dsid.get_num_chunks() != count:
        return False
    if not count:
        return True
    if not hasattr(dsid, "get_chunk_info_by_coord"):   # HDF5 < 1.10.5: nothing to compare with
        return False
    try:
        for i in sorted({0, count // 2, count - 1}):
            info = dsid.get_chunk_info_by_coord(tuple(int(x) for x in table.offsets[i]))
            if (info.byte_offset, info.size, info.filter_mask) != (
                    table.addresses[i], table.sizes[i], table.filter_masks[i]):
                return False
    except (ValueError, RuntimeError, OSError):
        return False
    return True


def _chunk_table(dsid: Any) -> _Chunks:
    """Every allocated chunk of the chunked dataset ``dsid`` (an ``h5d.DatasetID``), from one pass over its
    chunk index (``chunk_iter``, HDF5 >= 1.12.3) or, with an older HDF5, one ``get_chunk_info`` call per chunk."""
    infos: list[Any] = []
    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(infos.append)
    else:
        infos = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    if not infos:
        empty = np.zeros(0, dtype=np.int64)
        return _Chunks(np.zeros((0, dsid.rank), dtype=np.int64), empty, empty, empty)
    offsets, masks, addresses, sizes = zip(*infos)   # StoreInfo: (chunk_offset, filter_mask, byte_offset, size)
    return _Chunks(np.array(offsets, dtype=np.int64).reshape(len(infos), dsid.rank),
                   *(np.array(column, dtype=np.int64) for column in (addresses, sizes, masks)))


_UNDEFINED_ADDRESS = 2**64 - 1   # HDF5's "no address" (all bits set): a chunk index with no chunk yet
_BTREE_NODE_HEAD = 24            # "TREE", node type, level, entries used (2), left and right sibling addresses


def _btree_chunks(ds: h5py.Dataset) -> _Chunks | None:
    """The chunk table read straight from the dataset's version 1 B-tree (the chunk index of HDF5's default,
    earliest file format, which TRIDENT and CLAM files use), about 100x faster than HDF5's chunk iteration
    (a Python object per chunk); ``None`` when the dataset has no such index, the file has 8-byte addresses and
    no user block otherwise, or the tree is not what the file format specification (III.A.1) describes."""
    h5 = ds.file
    sizeof_address, sizeof_size = h5.id.get_create_plist().get_sizes()
    if sizeof_address != 8 or h5.userblock_size:
        return None
    link = h5.id.links.get_info(ds.name.encode())
    if link.type != h5l.TYPE_HARD:
        return None
    dims = ds.id.rank + 1   # a chunk key also holds a last, zero offset into the element
    try:
        with open(h5.filename, "rb") as f:
            body = _layout_message(f, 0, link.u, sizeof_address, sizeof_size)   # ``u``: the object header's address
            # layout message version 3, chunked: version, class, dimensionality, B-tree address, chunk dims (4 bytes
            # each, the last the element size)
            if (body is None or body[:3] != bytes([3, h5d.CHUNKED, dims]) or len(body) < 11 + 4 * dims
                    or np.frombuffer(body, "<u4", dims, 11).tolist() != [*ds.chunks, ds.id.get_type().get_size()]):
                return None
            root = int.from_bytes(body[3:11], "little")
            grid = math.prod(-(-int(size) // int(chunk)) for size, chunk in zip(ds.shape, ds.chunks))
            leaves = b"" if root == _UNDEFINED_ADDRESS else _btree_leaves(f, root, dims, 2 * grid + 64)
    except (OSError, ValueError, EOFError, OverflowError):
        return None
    if leaves is None:
        return None
    entries = np.frombuffer(leaves, _btree_entry(dims))
    offsets = entries["offset"]
    if (offsets[:, -1] != 0).any() or (offsets >= 2**62).any() or (entries["child"] >= 2**62).any():
        return None
    offsets = offsets[:, :-1].astype(np.int64)
    if len(offsets) > 1:   # keys strictly ascending (lexicographically), as HDF5's lookups require
        step = np.diff(offsets, axis=0)
        first = np.argmax(step != 0, axis=1)
        if not (step[np.arange(len(step)), first] > 0).all():
            return None
    return _Chunks(offsets, entries["child"].astype(np.int64), entries["size"].astype(np.int64),
                   entries["mask"].astype(np.int64))


@functools.cache
def _btree_entry(dims: int) -> np.dtype:
    """A chunk B-tree key (chunk bytes, filter mask, ``dims`` offsets) and the child address after it."""
    return np.dtype([("size", "<u4"), ("mask", "<u4"), ("offset", "<u8", (dims,)), ("child", "<u8")])


def _btree_leaves(f: BinaryIO, root: int, dims: int, limit: int) -> bytes | None:
    """The entries (``_btree_entry``) of every leaf node of the chunk B-tree at ``root``, left to right; ``None``
    for a node that is not a chunk node of the level its parent says, or more than ``limit`` entries in all (a
    corrupt tree)."""
    entry = _btree_entry(dims)
    leaves: list[bytes] = []
    pending, seen, end = [(root, -1)], 0, os.fstat(f.fileno()).st_size
    while pending:
        at, level = pending.pop()
        if at >= end:
            return None
        f.seek(at)
        head = f.read(_BTREE_NODE_HEAD)
        if len(head) != _BTREE_NODE_HEAD or head[:5] != b"TREE\x01" or level not in (-1, head[5]):
            return None
        used = int.from_bytes(head[6:8], "little")
        seen += used
        if seen > limit:
            return None
        data = f.read(used * entry.itemsize)   # key 0, child 0, ..., key used-1, child used-1 (the last key unread)
        if len(data) != used * entry.itemsize:
            return None
        if head[5] == 0:
            leaves.append(data)
        else:
            pending.extend((child, head[5] - 1) for child in np.frombuffer(data, entry)["child"][::-1].tolist())
    return b"".join(leaves)


def _read_exact(f: Any, offset: int, view: memoryview) -> bool:
    """Fill ``view`` from ``offset`` (a single read may return less, e.g. above 2 GiB); False at end of file."""
    f.seek(offset)
    while len(view):
        got = f.readinto(view)
        if not got:
            return False
        view = view[got:]
    return True


def _attrs(h5: h5py.File, features: h5py.Dataset, coords: h5py.Dataset) -> SlideAttrs:
    """TRIDENT attributes from ``coords``/``features``, falling back to the file's root attributes."""
    geometry = (coords.attrs, features.attrs, h5.attrs)
    patch_level0 = _number(geometry, "patch_size_level0")
    patch = _number(geometry, "patch_size")
    level0_mag = _number(geometry, "level0_magnification")
    magnification = _number(geometry, "target_magnification")
    if magnification is None and level0_mag is not None and patch is not None and patch_level0 is not None:
        magnification = level0_mag * patch / patch_level0
    if patch_level0 is None and patch is not None and level0_mag is not None and magnification is not None:
        patch_level0 = patch * level0_mag / magnification
    encoder = _text((features.attrs, h5.attrs, coords.attrs), "encoder")
    return SlideAttrs(
        patch_size_level0=None if patch_level0 is None else int(round(patch_level0)),
        encoder=encoder,
        magnification=magnification,
    )


def _first(sources: tuple[Any, ...], name: str) -> Any:
    """The first usable value of attribute ``name`` (TRIDENT writes ``None`` as the string 'None')."""
    for attrs in sources:
        try:
            value = attrs.get(name)
        except (OSError, TypeError, ValueError):  # an attribute h5py cannot decode is ignored, not fatal
            continue
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(()).item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value is not None and str(value).strip() not in ("", "None", "none", "null"):
            return value
    return None


def _number(sources: tuple[Any, ...], name: str) -> float | None:
    value = _first(sources, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _text(sources: tuple[Any, ...], name: str) -> str | None:
    value = _first(sources, name)
    return str(value).strip() if value is not None else None


DEFAULT_PATCH_SIZE = 256   # patch side when neither the file nor the coordinates tell (a single patch)


def infer_patch_size(coords: np.ndarray) -> int:
    """The level-0 patch side implied by the coordinates: the smallest positive step between distinct x or y
    values (patches tile a grid), or :data:`DEFAULT_PATCH_SIZE` for a single patch."""
    steps = []
    for axis in (0, 1):
        gaps = np.diff(np.unique(coords[:, axis]))
        gaps = gaps[gaps > 0]
        if gaps.size:
            steps.append(int(gaps.min()))
    return min(steps) if steps else DEFAULT_PATCH_SIZE


def level0_patch_size(path: str | os.PathLike[str], coords: np.ndarray | None = None) -> int:
    """A slide's level-0 patch side: TRIDENT's ``patch_size_level0`` attribute, else :func:`infer_patch_size`
    of ``coords`` (read from the file when not given)."""
    size = read_slide_header(path)[2].patch_size_level0
    if size:
        return int(size)
    return infer_patch_size(read_slide(path).coords if coords is None else coords)
