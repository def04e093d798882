"""``OUT_DIR/predictions.csv`` (one row per ``.h5`` file found, discovery order), rewritten atomically, and the
``OUT_DIR/run.json`` sidecar that lets ``--resume`` trust earlier rows (same model, file unchanged)."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from momkd.errors import MomkdError

COLUMNS = ("slide_id", "file", "status", "error", "n_patches", "probability", "prediction")
PREDICTIONS = "predictions.csv"
RUN_INFO = "run.json"


class ResultsError(MomkdError):
    """The output folder holds results this run cannot use (a usage error: exit code 2)."""


@dataclass
class ResultRow:
    slide_id: str
    file: str
    status: str                      # "ok" | "error"
    error: str = ""
    n_patches: str = ""
    probability: str = ""
    prediction: str = ""

    @classmethod
    def ok(cls, slide_id: str, file: str, n_patches: int, probability: float, prediction: str) -> "ResultRow":
        return cls(slide_id, file, "ok", "", str(int(n_patches)), format_probability(probability), prediction)

    @classmethod
    def failed(cls, slide_id: str, file: str, error: str, n_patches: int | None = None) -> "ResultRow":
        return cls(slide_id, file, "error", " ".join(error.split()), "" if n_patches is None else str(int(n_patches)))

    def values(self) -> list[str]:
        return [self.slide_id, self.file, self.status, self.error, self.n_patches, self.probability, self.prediction]


def format_probability(p: float) -> str:
    """Round-trip precision for float32 (9 significant digits)."""
    return f"{float(p):.9g}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass


def read_predictions(path: Path) -> list[ResultRow]:
    """Rows of an existing predictions.csv; ResultsError if it is not one of ours."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot be read for --resume ({e})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(header) != COLUMNS:
        raise ResultsError(f"{path}: not a momkd predictions file (header {header}); use another --out")
    rows = []
    for i, rec in enumerate(reader, start=2):
        if not rec:
            continue
        if len(rec) != len(COLUMNS) or rec[2] not in ("ok", "error"):
            raise ResultsError(f"{path}: line {i} is malformed; use another --out or run without --resume")
        rows.append(ResultRow(*rec))
    return rows


def file_stamp(path: Path) -> list[int] | None:
    """(size, mtime_ns) of a slide file: an earlier row is reused only while this is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


class ResultsWriter:
    """Holds the row of every file (by discovery index) and rewrites predictions.csv atomically on ``flush``."""

    def __init__(self, out_dir: Path, n_files: int) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / PREDICTIONS
        self.rows: list[ResultRow | None] = [None] * n_files
        self.dirty = True

    def set(self, index: int, row: ResultRow) -> None:
        self.rows[index] = row
        self.dirty = True

    def flush(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for row in self.rows:
            if row is not None:
                w.writerow(row.values())
        atomic_write_text(self.path, buf.getvalue())
        self.dirty = False

    @property
    def n_ok(self) -> int:
        return sum(1 for r in self.rows if r is not None and r.status == "ok")

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.rows if r is not None and r.status == "error")


def write_run_info(out_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(Path(out_dir) / RUN_INFO, json.dumps(info, indent=1) + "\n")


def read_run_info(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
