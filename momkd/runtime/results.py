"""``OUT_DIR/predictions.csv`` (the rows of a run) and the ``OUT_DIR/run.json`` sidecar that lets ``--resume``
trust earlier rows (same model, same input folder, file unchanged).

Format: UTF-8 CSV, ``\\n`` line ends, the header ``COLUMNS``, then one row per ``.h5`` file found; a row's
``error`` is one line; ``probability`` has 9 significant digits (float32 round trip); ``threshold`` is the model's
decision threshold (``prediction`` is the positive class when ``probability >= threshold``). A field holding a
line break or a carriage return is quoted. A text cell that a spreadsheet would run as a formula (it starts with
``= + - @``, a tab or a carriage return) is written with a leading ``'`` (OWASP's CSV-injection advice), and so is
a cell that starts with ``'`` itself: ``read_predictions`` strips that one ``'``, so every value round-trips
exactly.

Durability contract (what the file holds at any moment, a ``kill -9`` or a crash included):

1. Start of a run (``ResultsWriter.flush``): the file is replaced atomically (temp file, fsync, ``os.replace``,
   fsync of the folder) by the header and the rows kept by ``--resume``, in discovery order; *then* run.json is
   written. So predictions.csv never holds rows that the run.json beside it cannot vouch for.
2. During the run (``ResultsWriter.commit``, after each pack): the rows recorded since the last write (that pack's
   slides, and slides that failed while being read meanwhile) are appended in one write, in discovery order
   among themselves, then flushed and fsynced. Bytes written per pack are those rows' bytes: the file is never
   rewritten mid-run. A file index gets at most one row per run (``set`` refuses a second), so the file holds
   no duplicates; while a run goes on its rows are in completion order.
3. End of the run (finished, failed or interrupted, but not killed): the whole file is rewritten once, atomically,
   in discovery order: one row per file index (every discovered file, for a finished run).
4. A run killed in the middle of an append can leave a torn last record (the file does not end with a newline,
   or ends inside a quoted field). ``read_predictions`` ignores that record, so ``--resume`` redoes its slide;
   any other malformed line is an error. The resumed run starts with step 1 again: its file has no torn tail.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

from momkd.atomic import write_text as atomic_write_text
from momkd.errors import MomkdError

COLUMNS = ("slide_id", "file", "status", "error", "n_patches", "probability", "prediction", "threshold")
LEGACY_COLUMNS = COLUMNS[:-1]    # before the threshold column: still read (those rows' threshold is "")
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")   # a cell a spreadsheet would evaluate (OWASP CSV injection)
TEXT_MARK = "'"                                    # written before such a cell (and before a cell starting with it)
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
    threshold: str = ""              # the model's decision threshold (ok rows)

    @classmethod
    def ok(cls, slide_id: str, file: str, n_patches: int, probability: float, prediction: str, *,
           threshold: float) -> "ResultRow":
        return cls(slide_id, file, "ok", "", str(int(n_patches)), format_probability(probability), prediction,
                   format_probability(threshold))

    @classmethod
    def failed(cls, slide_id: str, file: str, error: str, n_patches: int | None = None) -> "ResultRow":
        return cls(slide_id, file, "error", " ".join(error.split()), "" if n_patches is None else str(int(n_patches)))

    def values(self) -> list[str]:
        return [self.slide_id, self.file, self.status, self.error, self.n_patches, self.probability, self.prediction,
                self.threshold]


def format_probability(p: float) -> str:
    """Round-trip precision for float32 (9 significant digits)."""
    return f"{float(p):.9g}"


def spreadsheet_cell(value: str) -> str:
    """``value`` as written to a CSV cell: a leading ``'`` when a spreadsheet would run it as a formula (or when it
    starts with ``'`` itself, so that ``plain_cell`` can always undo it)."""
    return TEXT_MARK + value if value.startswith((*FORMULA_LEADS, TEXT_MARK)) else value


def plain_cell(cell: str) -> str:
    """The value of a cell written by ``spreadsheet_cell``."""
    return cell[1:] if cell.startswith(TEXT_MARK) else cell


def read_predictions(path: Path) -> list[ResultRow]:
    """Rows of an existing predictions.csv (a torn last record ignored, see the module docstring); ResultsError if
    it is not one of ours or a line is malformed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResultsError(f"{path}: cannot be read for --resume ({e})") from None
    torn = not data.endswith(b"\n")
    cut = data.rfind(b"\n") + 1     # a torn tail may end inside a UTF-8 sequence: decode it leniently
    try:
        text = data[:cut].decode("utf-8") + data[cut:].decode("utf-8", errors="replace")
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: cannot be read for --resume ({e})") from None
    records, torn = _records(text, torn, path)
    header = tuple(records[0][1]) if records else None
    if header not in (COLUMNS, LEGACY_COLUMNS):
        raise ResultsError(f"{path}: not a momkd predictions file (header {header}); use another --out")
    if torn and len(records) > 1:
        records.pop()                 # the record a killed append left half written
    rows = []
    for line, rec in records[1:]:
        if not rec:
            continue
        if len(rec) != len(header) or rec[2] not in ("ok", "error"):
            raise _malformed(path, line)
        rows.append(ResultRow(*(plain_cell(cell) for cell in rec)))
    return rows


def _malformed(path: Path, line: int) -> ResultsError:
    return ResultsError(f"{path}: line {line} is malformed; use another --out or run without --resume")


def _records(text: str, torn: bool, path: Path) -> tuple[list[tuple[int, list[str]]], bool]:
    """(first line number, fields) of each CSV record, and whether the last of them is torn (``torn``, the text
    not ending with a newline). A text that ends inside a quoted field is torn too: that record is left out."""
    reader = csv.reader(io.StringIO(text), strict=True)
    records: list[tuple[int, list[str]]] = []
    line = 1
    try:
        for rec in reader:
            records.append((line, rec))
            line = reader.line_num + 1
    except csv.Error as e:
        if "end of data" not in str(e):      # not an unfinished quoted field at the end of the file
            raise _malformed(path, line) from None
        return records, False              # the unfinished record is left out already
    return records, torn


def file_stamp(path: Path) -> list[int] | None:
    """(size, mtime_ns, ctime_ns, inode, device) of a slide file (its target, for a symlink): an earlier row is
    reused only while this is unchanged. A file rewritten in place within the mtime's resolution, or replaced
    by another file (a copy, a rename over it) changes its ctime or inode even where the size and the mtime
    stay. A stamp of another form (an older momkd's (size, mtime_ns)) never equals it: that slide is redone."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino), int(st.st_dev)]


class ResultsWriter:
    """The row of every file of a run (by discovery index) and predictions.csv: ``flush`` rewrites the file whole,
    atomically, in discovery order (start and end of a run); ``commit`` appends the rows set since the last write
    and fsyncs (after each pack). ``bytes_written`` counts the bytes of both."""

    def __init__(self, out_dir: Path, n_files: int) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / PREDICTIONS
        self.rows: list[ResultRow | None] = [None] * n_files
        self.pending: list[int] = []     # indices set since the last flush/commit (not in the file yet)
        self.dirty = True                # rows set since the last flush (the file is not the ordered whole)
        self.bytes_written = 0

    def set(self, index: int, row: ResultRow) -> None:
        if self.rows[index] is not None:
            raise ValueError(f"{self.path}: a second row for {row.file} in one run")
        self.rows[index] = row
        self.pending.append(index)
        self.dirty = True

    def flush(self) -> None:
        text = csv_text([COLUMNS] + [row.values() for row in self.rows if row is not None])
        atomic_write_text(self.path, text)
        self.bytes_written += len(text.encode("utf-8"))
        self.pending.clear()
        self.dirty = False

    def commit(self) -> None:
        """Append the pending rows (discovery order among themselves) in one write, flush, fsync."""
        if not self.pending:
            return
        rows = [self.rows[i] for i in sorted(self.pending)]
        self.pending.clear()            # never appended twice, even after a failed write (the end rewrites all)
        data = csv_text([row.values() for row in rows if row is not None]).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.bytes_written += len(data)

    @property
    def n_ok(self) -> int:
        return sum(1 for r in self.rows if r is not None and r.status == "ok")

    @property
    def n_failed(self) -> int:
        return sum(1 for r in self.rows if r is not None and r.status == "error")


def csv_text(records: Iterable[Sequence[str]]) -> str:
    """``records`` as CSV text: ``\\n`` line ends, a field quoted when it holds a delimiter, a quote, ``\\n`` or
    ``\\r`` (the csv module quotes only the line terminator's characters: each record is written with ``\\r\\n``
    and its last two characters replaced), every cell through ``spreadsheet_cell``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    lines = []
    for record in records:
        writer.writerow([spreadsheet_cell(str(value)) for value in record])
        lines.append(buf.getvalue()[:-2] + "\n")
        buf.seek(0)
        buf.truncate()
    return "".join(lines)


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
