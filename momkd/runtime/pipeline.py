"""``run_inference``: a folder of ``.h5`` slide files -> ``OUT_DIR/predictions.csv`` (+ attention files).

Three stages overlap::

    reader pool, threads or processes (read + validate + neighbour table; file order; read-ahead bounded by bytes)
        -> calling thread (packs up to the row budget, copied into one of two reused buffers)
            -> compute thread (backend.run; attention written; the pack's rows appended to predictions.csv and
               fsynced; the whole file rewritten atomically, in file order, once at the end: see ``results``)

Per-slide problems (every SlideError, duplicates, a file name that cannot be a row as it is, a slide over the
engine's row limit, a backend failure on one slide, a non-finite output (its pack re-run slide by slide, so
that only that slide fails), a slide past ``--slide-timeout`` in the reader or the model, a slide from another
encoder, an attention file name too long for the output folder) become ``status=error`` rows and the run goes
on. Model/usage problems (an input folder
without ``.h5`` files among them) raise a ``MomkdError`` before anything is written (or, for a model whose
outputs break the contract, stop the run after writing the rows finished so far).

The output folder is locked for the whole run (``outdir.OutputLock``: a second run into it is refused), and an
output folder that fills up, is read-only or refuses writes stops the run with one line naming it
(``outdir.output_errors``); the rows written until then stay valid for ``--resume``.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from momkd import __version__
from momkd.errors import ModelFolderError, MomkdError
from momkd.manifest import Manifest, load_manifest

from .attention_io import AttentionNameError, attention_path, discard_attention, write_attention
from .backends import REQUIRED_OUTPUTS, Backend, PrecisionChoice, choose_precision, reduced_backend, select_backend
from .discover import SlideFile, discover_slides, slides_below
from .heatmap_writer import HeatmapOptions, HeatmapReport, HeatmapWriter, heatmap_path
from momkd.data.batch import GraphSlide, Pack, check_output_shapes, split_outputs

from .outdir import OutputLock, output_errors
from .packing import BufferPool, Packer, PoolClosed
from .reader import POOLS, ReaderConfig, SlideFailure, SlideReader, one_line, resolve_pool
from .results import (PREDICTIONS, ResultRow, ResultsError, ResultsWriter, file_stamp, read_predictions,
                      read_run_info, write_run_info)

DEFAULT_BATCH_PATCHES = 32_768   # rows per pack on a GPU: ~16k+ rows keep it busy; 2 buffers = 400 MB at D=1536
CPU_BATCH_PATCHES = 4_096       # on the CPU: a slide of a few thousand rows keeps the cores as busy as a pack, and
                                # packing it would only add a copy that competes with the model for memory bandwidth
DEFAULT_WORKERS = 2
DEFAULT_SLIDE_TIMEOUT = 600.0    # seconds per slide, per stage (reader, model): far beyond any healthy slide
RAMP = 3                         # first packs of 1/8, 1/4, 1/2 of the budget: compute starts early


class UsageError(MomkdError):
    """Bad arguments (missing input folder, output folder inside the input folder, ...): exit code 2."""


@dataclass
class InferenceSummary:
    n_files: int                 # .h5 files found (= rows of predictions.csv)
    n_ok: int                    # rows with status ok (this run + kept by --resume)
    n_failed: int                # rows with status error
    n_kept: int                  # ok rows kept from an earlier run (--resume)
    n_processed: int             # slides handled by this run (ok or failed)
    elapsed_s: float             # wall time of the read/compute/write pipeline (after setup)
    setup_s: float               # manifest check, discovery, backend start
    backend: str
    device: str
    detail: str
    predictions_path: Path
    reader: str = "threads"      # the reader pool used
    # sums: read_s, graph_s (reader workers), compute_s (backend), wait_s (packing waits for reads), idle_s
    # (compute waits for packs)
    timings: dict[str, float] = field(default_factory=dict)
    heatmaps: HeatmapReport | None = None   # --heatmaps: PNGs written/kept and per-slide failures
    precision: str = "fp32"                 # the graph that ran (backends.choose_precision)

    @property
    def slides_per_s(self) -> float:
        return self.n_processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.n_failed == 0 else 1

    def line(self) -> str:
        kept = f" ({self.n_kept} kept from an earlier run)" if self.n_kept else ""
        heatmaps = f"; {self.heatmaps.line()}" if self.heatmaps is not None else ""
        return (f"{self.n_ok} ok, {self.n_failed} failed{kept}, {self.slides_per_s:.1f} slides/s "
                f"({self.backend}, {self.device}{'' if self.precision == 'fp32' else ', ' + self.precision}) -> "
                f"{self.predictions_path}{heatmaps}")


ProgressFn = Callable[[int, int, int, int], None]   # (done, total, ok, failed)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def default_batch_patches(device: str) -> int:
    """The row budget of one backend call on ``device`` when the user names none: ``CPU_BATCH_PATCHES`` on the
    CPU (slides above it run alone, in their own arrays: no copy), ``DEFAULT_BATCH_PATCHES`` elsewhere."""
    return CPU_BATCH_PATCHES if device == "cpu" else DEFAULT_BATCH_PATCHES


def _check_options(batch_patches: int | None, workers: int, reader: str) -> None:
    if batch_patches is not None and batch_patches < 1:
        raise UsageError(f"--batch-patches must be >= 1, got {batch_patches}")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if reader not in POOLS:
        raise UsageError(f"--reader must be one of {', '.join(POOLS)}, got {reader!r}")


def _check_paths(folder: Path, out_dir: Path) -> tuple[Path, Path]:
    if not folder.exists():
        raise UsageError(f"{folder}: input folder does not exist")
    if not folder.is_dir():
        raise UsageError(f"{folder}: input is not a folder")
    f, o = folder.resolve(), out_dir.resolve()
    if _is_within(o, f):
        raise UsageError(f"{out_dir}: the output folder must not be inside the input folder {folder} "
                         "(momkd never writes into the input folder)")
    if _is_within(f, o):
        raise UsageError(f"{out_dir}: the output folder must not contain the input folder {folder}")
    if o.exists() and not o.is_dir():
        raise UsageError(f"{out_dir}: output path exists and is not a folder")
    return f, o


def _kept_rows(out_dir: Path, folder: Path, files: list[SlideFile], manifest: Manifest,
               save_attention: bool, heatmaps: bool) -> dict[int, ResultRow]:
    """--resume: ok rows of an earlier run with the same model whose file is unchanged (and whose attention file
    and heatmap exist, when they are asked for), by discovery index."""
    pred = out_dir / PREDICTIONS
    if not pred.exists():
        return {}
    info = read_run_info(out_dir)
    if info is None:
        raise ResultsError(f"{pred}: no readable run.json beside it, so the model that made these rows is unknown; "
                           "run without --resume or use another --out")
    if info.get("model_manifest_sha256") != manifest.sha256:
        raise ResultsError(f"{pred}: made with another model ({info.get('model_dir')}); run without --resume or use "
                           "another --out")
    if info.get("input_folder") != str(folder):
        raise ResultsError(f"{pred}: made for another input folder ({info.get('input_folder')}); run without "
                           "--resume or use another --out")
    stamps = info.get("files")
    stamps = stamps if isinstance(stamps, dict) else {}
    by_rel = {f.rel: f for f in files}
    kept = {}
    for row in read_predictions(pred):
        f = by_rel.get(row.file)
        if (row.status == "ok" and f is not None and f.duplicate_of is None and f.bad_name is None
                and f.index not in kept and row.slide_id == f.slide_id and stamps.get(f.rel) == file_stamp(f.path)
                and (not save_attention or _is_file(attention_path(out_dir, f.slide_id)))
                and (not heatmaps or _is_file(heatmap_path(out_dir, f.slide_id)))):
            kept[f.index] = row
    return kept


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name cannot exist (too long for the filesystem)."""
    try:
        return path.is_file()
    except OSError:
        return False


def run_inference(model_dir: str | Path, folder: str | Path, out_dir: str | Path, *, backend: str = "auto",
                  device: str | None = None, recursive: bool = False,
                  batch_patches: int | None = None, workers: int = DEFAULT_WORKERS,
                  resume: bool = False, save_attention: bool = False, progress: ProgressFn | None = None,
                  log: Callable[[str], None] | None = None, threads: int | None = None,
                  reader: str = "auto", backend_obj: Backend | None = None,
                  heatmaps: HeatmapOptions | None = None, model_sha256: str | None = None,
                  engine: Callable[[Manifest], Backend] | None = None,
                  slide_timeout: float | None = DEFAULT_SLIDE_TIMEOUT,
                  allow_encoder_mismatch: bool = False, precision: str = "auto") -> InferenceSummary:
    """Predict every ``.h5`` slide file in ``folder`` with the model folder ``model_dir``; write ``out_dir``.

    ``backend``: auto | onnxruntime | tensorrt | torch; ``device``: None (best available) | cpu | cuda[:N];
    ``batch_patches``: row budget of one backend call (a larger slide runs alone; None: ``default_batch_patches``
    of the backend's device); ``workers``: readers;
    ``reader``: auto | threads | processes (auto: processes when the backend runs on a GPU, else threads);
    ``resume``: keep the ok rows of an earlier run in ``out_dir`` (same model, unchanged file) and do the rest;
    ``progress(done, total, ok, failed)`` and ``log(message)`` are called from the pipeline's threads, one call
    at a time (``log`` gets one-line notes and ``failed: FILE: CODE: MESSAGE`` lines).
    ``backend_obj``: an already built backend (benchmarks), instead of ``backend``/``device``.
    ``heatmaps``: also render ``out_dir/heatmaps/{slide_id}.png`` for every ok slide (needs matplotlib; see
    ``heatmap_writer``); a heatmap that fails is recorded and the run goes on.
    ``model_sha256``: the sha256 of the approved ``manifest.json`` (``momkd.manifest.resolve_pin``); a model
    folder whose manifest hashes differently is refused before anything is loaded.
    ``engine``: builds the compute engine from the verified manifest, instead of ``backend``/``device`` (``momkd
    infer --server``: ``momkd.runtime.remote.RemoteBackend``); closed at the end like a selected backend. An
    engine with ``run_pack(pack)`` gets whole packs (coords kept when it sets ``needs_coords``), see ``run_pack``.

    ``slide_timeout``: seconds a slide may take in the reader (read + checks + neighbour graph) and, separately,
    in the model; past it the slide gets a ``timeout`` row and the run goes on (0/None: no limit). A stuck
    reader process is killed; a reader thread cannot be (it runs on, its result dropped); an onnxruntime call is
    cancelled; a TensorRT or torch call cannot be and runs to its end.
    ``allow_encoder_mismatch``: use slides whose ``encoder`` attribute names another encoder than the model's
    (otherwise each is a failed row; recorded in run.json).
    ``precision``: auto | fp32 | int8 | bf16 (``backends.choose_precision``: auto runs the int8 graph where its
    gates passed and the CPU has VNNI/AMX); the choice and its reason are recorded in run.json.

    Raises ``MomkdError`` subclasses (ModelFolderError, BackendError, ResultsError, UsageError) for problems that
    are not one slide's; returns the summary otherwise (``summary.exit_code``: 0 all ok, 1 some failed).
    """
    t_setup = time.perf_counter()
    say = log or (lambda _m: None)
    _check_options(batch_patches, workers, reader)
    if slide_timeout is not None and not slide_timeout >= 0:
        raise UsageError(f"--slide-timeout must be >= 0 seconds (0: no limit), got {slide_timeout}")
    folder_p, out_p = _check_paths(Path(folder), Path(out_dir))
    manifest = _load_model(model_dir, say, model_sha256)
    painter = (HeatmapWriter(out_p, heatmaps, manifest.model.class_names[1], manifest.model.threshold, say)
               if heatmaps is not None else None)
    files = _discover(folder_p, str(folder), recursive, say)
    with _output_folder(out_p, say), output_errors(out_p):
        kept = _resume_rows(resume, out_p, folder_p, files, manifest, save_attention, painter is not None, say)
        choice = (choose_precision(manifest, precision, backend, device) if backend_obj is None and engine is None
                  else PrecisionChoice("fp32", "a prebuilt backend or engine"))
        if choice.precision != "fp32" or manifest.reduced:   # (always in run.json)
            say(f"note: precision {choice.precision} ({choice.reason})")
        be = (backend_obj if backend_obj is not None else engine(manifest) if engine is not None
              else reduced_backend(manifest, choice.precision, threads) if choice.precision != "fp32"
              else select_backend(backend, device, manifest, log=say, threads=threads))
        try:
            writer = _start_results(out_p, files, kept, painter)
            write_run_info(out_p, {**_run_info(model_dir, manifest, folder_p, recursive, be, files),
                                   "precision": choice.precision, "precision_reason": choice.reason,
                                   "slide_timeout_s": slide_timeout or None,
                                   "allow_encoder_mismatch": allow_encoder_mismatch})
        except BaseException:
            if backend_obj is None:
                be.close()
            raise
        run = InferenceRun([f for f in files if f.index not in kept], manifest, be, writer, out_p, painter, say,
                           progress, total=len(files), n_kept=len(kept),
                           batch_patches=batch_patches or default_batch_patches(be.device),
                           workers=workers, save_attention=save_attention, pool=resolve_pool(reader, be.device),
                           slide_timeout=slide_timeout or None, allow_encoder_mismatch=allow_encoder_mismatch)
        setup_s = time.perf_counter() - t_setup
        elapsed, painted = _execute(run, close_backend=backend_obj is None)
    summary = _summary(run, elapsed, setup_s, painted)
    summary.precision = choice.precision
    return summary


@contextlib.contextmanager
def _output_folder(out_p: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Create the output folder (when missing) and hold its lock (``outdir.OutputLock``) while the block runs; a
    folder made here that the run leaves empty (it stopped before writing anything) is removed again."""
    created = not out_p.exists()
    with output_errors(out_p):
        out_p.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out_p)
    try:
        lock.acquire()
        if not lock.supported:
            say(f"note: {out_p} cannot be locked on this filesystem: make sure no other momkd infer writes into it")
        yield
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                out_p.rmdir()      # only when empty


def _load_model(model_dir: str | Path, say: Callable[[str], None], pinned_sha256: str | None = None) -> Manifest:
    """The model folder's manifest (the pinned manifest hash, when given, and the checksums verified) and the
    graph library it needs."""
    manifest = load_manifest(model_dir, verify_checksums=True, pinned_sha256=pinned_sha256)
    check_graph_library(manifest, say)
    return manifest


def check_graph_library(manifest: Manifest, say: Callable[[str], None]) -> None:
    """An official-graph model needs scikit-learn (the authors' neighbour sets); say when its version differs
    from the one the model was exported with (its KD-tree tie order is what the model was trained on)."""
    if manifest.model.graph_direction != "official":
        return
    from momkd.graph import sklearn_version

    try:
        installed = sklearn_version()
    except ImportError as e:
        raise UsageError(f"{manifest.root}: {e}") from None
    recorded = manifest.model.graph_library.get("scikit-learn")
    if recorded and recorded != installed:
        say(f"warning: {manifest.root} was exported with scikit-learn {recorded}, this is {installed}: "
            "neighbour ties on patch grids may fall differently")


def _discover(folder_p: Path, folder: str, recursive: bool, say: Callable[[str], None]) -> list[SlideFile]:
    """The slide files of the input folder (entries that only look like one are noted); a usage error when
    there are none (an empty or mistyped folder must not end as a successful run of nothing)."""
    files = discover_slides(folder_p, recursive=recursive, note=say)
    if not files:
        if recursive:
            raise UsageError(f"no .h5 files in {folder} or its subfolders")
        hint = " (did you mean --recursive? its subfolders hold some)" if slides_below(folder_p) else ""
        raise UsageError(f"no .h5 files in {folder}{hint}")
    return files


def _resume_rows(resume: bool, out_p: Path, folder_p: Path, files: list[SlideFile], manifest: Manifest,
                 save_attention: bool, heatmaps: bool, say: Callable[[str], None]) -> dict[int, ResultRow]:
    """The rows kept from an earlier run (--resume), by discovery index; without --resume, none (and a note
    when an earlier run's predictions.csv is about to be replaced)."""
    if resume:
        return _kept_rows(out_p, folder_p, files, manifest, save_attention, heatmaps)
    if (out_p / PREDICTIONS).exists():
        say(f"note: replacing {out_p / PREDICTIONS} from an earlier run (--resume keeps its finished rows)")
    return {}


def _start_results(out_p: Path, files: list[SlideFile], kept: dict[int, ResultRow],
                   painter: HeatmapWriter | None) -> ResultsWriter:
    """Replace predictions.csv by the kept rows (atomically, before run.json)."""
    writer = ResultsWriter(out_p, len(files))
    for index, row in kept.items():
        writer.set(index, row)
    if painter is not None:
        painter.start()
        for row in kept.values():
            painter.keep(row.slide_id)
    writer.flush()   # from here on predictions.csv never holds rows of another run that run.json cannot vouch for
    return writer


def _run_info(model_dir: str | Path, manifest: Manifest, folder_p: Path, recursive: bool, be: Backend,
              files: list[SlideFile]) -> dict[str, Any]:
    return {
        "momkd_version": __version__, "model_dir": str(Path(model_dir).resolve()),
        "model_manifest_sha256": manifest.sha256, "input_folder": str(folder_p), "recursive": recursive,
        "backend": be.name, "device": be.device, "detail": be.detail,
        "files": {f.rel: file_stamp(f.path) for f in files},
    }


def _execute(run: "InferenceRun", close_backend: bool) -> tuple[float, HeatmapReport | None]:
    """Run the pipeline (when there is anything to do), leave the ordered predictions.csv, close the backend
    (``close_backend``) and the heatmap writer; (elapsed seconds, heatmap report)."""
    run.report()
    t0 = time.perf_counter()
    finished = False
    try:
        if run.todo:
            run.run()
        if run.writer.dirty:
            run.writer.flush()
        finished = True
    finally:
        if close_backend:
            run.be.close()
        painted = run.painter.close(cancel=not finished) if run.painter is not None else None
    return time.perf_counter() - t0, painted


def _summary(run: "InferenceRun", elapsed: float, setup_s: float, painted: HeatmapReport | None) -> InferenceSummary:
    w, be = run.writer, run.be
    return InferenceSummary(n_files=run.total, n_ok=w.n_ok, n_failed=w.n_failed, n_kept=run.n_kept, reader=run.pool,
                            n_processed=len(run.todo), elapsed_s=elapsed, setup_s=setup_s, backend=be.name,
                            device=be.device, detail=be.detail, predictions_path=w.path, timings=run.timings,
                            heatmaps=painted)


@dataclass(eq=False)
class InferenceRun:
    """One run's pipeline over ``todo`` and its shared state (counts, timings, the results writer, the lock).

    The calling thread takes slides in file order from the reader pool and packs them (copying into one of two
    reused buffers); a compute thread runs each pack through the backend and records its rows, so packing,
    copying and writing overlap the compute. Packs depend on file order, slide sizes and the row budget only
    (never on timing): the same folder and budget give the same packs and bit-identical outputs run after run.
    """

    todo: list[SlideFile]
    manifest: Manifest
    be: Backend
    writer: ResultsWriter
    out_p: Path
    painter: HeatmapWriter | None
    say: Callable[[str], None]
    progress: ProgressFn | None
    total: int
    n_kept: int
    batch_patches: int
    workers: int
    save_attention: bool
    pool: str
    slide_timeout: float | None = None       # seconds a slide may take in the reader and in one model call
    allow_encoder_mismatch: bool = False     # use slides whose encoder attribute names another encoder
    counts: dict[str, int] = field(init=False)
    # sums: see InferenceSummary.timings
    timings: dict[str, float] = field(init=False)
    lock: Any = field(init=False, default_factory=threading.RLock)   # rows, counts, CSV, progress: both threads
    stop: threading.Event = field(init=False, default_factory=threading.Event)
    packs: "queue.Queue[Pack | None]" = field(init=False, default_factory=lambda: queue.Queue(maxsize=1))
    crashed: list[BaseException] = field(init=False, default_factory=list)
    max_rows: int = field(init=False)                    # the row budget of one pack (engine limit included)
    max_width: int | None = field(init=False)            # the engine's widest neighbour table, if limited
    reader: SlideReader = field(init=False, repr=False)  # these two: made by ``run``
    packer: Packer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.counts = {"ok": self.n_kept, "failed": 0}
        self.timings = {"read_s": 0.0, "graph_s": 0.0, "compute_s": 0.0, "wait_s": 0.0, "idle_s": 0.0}
        be = self.be
        self.max_rows = min(self.batch_patches, be.max_rows) if be.max_rows else self.batch_patches
        self.max_width = getattr(be, "max_width", None)

    def report(self) -> None:
        if self.progress is not None:
            c = self.counts
            self.progress(c["ok"] + c["failed"], self.total, c["ok"], c["failed"])

    # -- the calling thread: read, pack, submit ----------------------------------------------------------------

    def run(self) -> None:
        """Read, pack and compute every slide of ``todo``; re-raise the compute thread's error, if any."""
        model = self.manifest.model
        cfg = ReaderConfig(feature_dim=model.feature_dim, k=model.k, direction=model.graph_direction,
                           keep_coords=(self.save_attention or self.painter is not None
                                        or getattr(self.be, "needs_coords", False)),
                           encoder=None if self.allow_encoder_mismatch else model.encoder)
        self.reader = SlideReader(self.todo, cfg, workers=self.workers, max_inflight=64, pool=self.pool,
                                  max_inflight_bytes=max(self.max_rows * model.feature_dim * 4, 64 << 20),
                                  slide_timeout=self.slide_timeout)
        self.packer = Packer(self.max_rows, self.be.max_slides,
                             BufferPool(self.max_rows, max_buffers=2, stop=self.stop), ramp=RAMP)
        worker = threading.Thread(target=self.compute_loop, name="momkd-compute", daemon=True)
        worker.start()
        try:
            self.feed()
            worker.join()
        finally:
            self.finish(worker)
        if self.crashed:
            raise self.crashed[0]

    def feed(self) -> None:
        """Every slide, in file order, into the packer; its packs, then the end mark, to the compute thread.
        ``PoolClosed`` means the run is stopping (the compute worker failed): its error is raised by ``run``."""
        with contextlib.suppress(PoolClosed):
            while not self.reader.exhausted:
                tw = time.perf_counter()
                item = self.reader.take()                 # the next slide in file order (waits if not read yet)
                self.timings["wait_s"] += time.perf_counter() - tw
                self.add_slide(item)
            last = self.packer.finish()
            if last is not None:
                self.submit(last)
            self.submit(None)

    def add_slide(self, item: GraphSlide | SlideFailure) -> None:
        if isinstance(item, GraphSlide):
            self.timings["read_s"] += item.read_s
            self.timings["graph_s"] += item.graph_s
            limit = self._engine_limit(item)
            if limit is None:
                for pack in self.packer.add(item):
                    self.submit(pack)
                return
            item = SlideFailure(item.meta, "too_large", limit + " (use --backend onnxruntime)", item.n)
        self.record_failure(item)

    def _engine_limit(self, item: GraphSlide) -> str | None:
        """Why the backend's engine cannot take this slide (None: it can)."""
        be = self.be
        if be.max_rows and item.n > be.max_rows:
            return f"slide has {item.n} patches, more than the {be.name} engine's maximum of {be.max_rows}"
        if self.max_width and item.neighbors.shape[1] > self.max_width:
            return (f"neighbour table is {item.neighbors.shape[1]} wide, more than the {be.name} engine's "
                    f"maximum of {self.max_width}")
        return None

    def submit(self, pack: Pack | None) -> None:
        """Hand a pack (None: the end) to the compute thread; PoolClosed once the run is stopping."""
        while True:
            if self.stop.is_set():
                if pack is not None:
                    pack.release()
                raise PoolClosed()
            try:
                self.packs.put(pack, timeout=0.05)
                return
            except queue.Full:
                continue

    def finish(self, worker: threading.Thread) -> None:
        """Stop the readers, let the pack in flight finish (an interrupted run too) and rewrite predictions.csv
        whole, in file order."""
        self.stop.set()
        self.reader.close()
        worker.join(timeout=60)
        with self.lock:
            self.writer.flush()
        for f in self.reader.abandoned:
            self.say(f"note: the timed-out read of {f.rel} still runs in a reader thread (a thread cannot be "
                     "stopped); momkd exits once it returns (--reader processes stops such reads)")

    # -- the compute thread ------------------------------------------------------------------------------------

    def compute_loop(self) -> None:
        while True:
            pack = self._next_pack()
            if pack is None:
                return
            if self.stop.is_set():          # interrupted: start nothing new
                pack.release()
                return
            try:
                tc = time.perf_counter()
                results = run_pack(self.be, pack, self.slide_timeout)
                self.timings["compute_s"] += time.perf_counter() - tc
                pack.release()
                self.record_results(results)
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                pack.release()
                self.crashed.append(e)
                self.stop.set()
                return

    def _next_pack(self) -> Pack | None:
        """The next pack; None at the end mark, or once the run is stopping while none is queued."""
        while True:
            ti = time.perf_counter()
            try:
                pack = self.packs.get(timeout=0.05)
            except queue.Empty:
                self.timings["idle_s"] += time.perf_counter() - ti
                if self.stop.is_set():
                    return None
                continue
            self.timings["idle_s"] += time.perf_counter() - ti
            return pack

    # -- recording (either thread, under the lock) -------------------------------------------------------------

    def record_results(self, results: list[SlideOutcome]) -> None:
        """One pack's outcomes: rows (and attention files, heatmaps); the new rows appended to the CSV."""
        with self.lock:
            for entry, out in results:
                if isinstance(out, SlideFailure):
                    self._fail(out)
                else:
                    self._record_ok(entry, out)
            self.writer.commit()
            self.report()

    def record_failure(self, f: SlideFailure) -> None:
        with self.lock:
            self._fail(f)
            self.report()

    def _record_ok(self, entry: Any, out: dict[str, Any]) -> None:
        file: SlideFile = entry.meta
        model = self.manifest.model
        p = float(out["probability"])
        pred = model.class_names[1] if p >= model.threshold else model.class_names[0]
        if self.save_attention:
            try:
                write_attention(self.out_p, file.slide_id, entry.coords, out["attention"], out["patch_score"],
                                source=str(file.path), probability=p, model_sha256=self.manifest.sha256)
            except AttentionNameError as e:
                self._fail(SlideFailure(file, e.code, e.message, entry.n))
                return
        self.writer.set(file.index, ResultRow.ok(file.slide_id, file.rel, entry.n, p, pred,
                                                 threshold=model.threshold))
        self.counts["ok"] += 1
        if self.painter is not None:
            self.painter.submit(file.slide_id, file.path, entry.coords, out, p, pred)

    def _fail(self, f: SlideFailure) -> None:
        self.writer.set(f.file.index,
                        ResultRow.failed(f.file.slide_id, f.file.rel, f"{f.code}: {f.message}", f.n_patches))
        self.counts["failed"] += 1
        self.say(f"failed: {f.file.rel}: {f.code}: {f.message}")
        if f.code not in ("duplicate", "bad_name"):   # never leave an older run's attention or heatmap for a failed
            if self.save_attention:                      # slide (those two never had their own)
                discard_attention(self.out_p, f.file.slide_id)
            if self.painter is not None:
                self.painter.discard(f.file.slide_id)


def _check_outputs(outputs: dict[str, np.ndarray], pack: Pack) -> None:
    problem = check_output_shapes(outputs, pack, REQUIRED_OUTPUTS)
    if problem is not None:
        raise ModelFolderError(problem)


NON_FINITE_OUTPUT = "model output is not finite (features out of the encoder's range?)"

SlideOutcome = tuple[Any, "dict[str, Any] | SlideFailure"]   # (pack entry, its outputs or its failure)


class _ModelTimeout(Exception):
    """The backend call ran past the slide budget and was cancelled."""


def _call(be: Backend, pack: Pack, budget: float | None) -> dict[str, np.ndarray]:
    """One backend call on ``pack``. With a ``budget`` (seconds) and a backend whose calls can be cancelled
    (``run_options``: onnxruntime), a watchdog timer cancels a call that runs longer (``_ModelTimeout``); other
    backends' calls cannot be stopped and run to the end."""
    run_pack = getattr(be, "run_pack", None)   # a remote engine (momkd.runtime.remote) takes the whole pack
    if run_pack is not None:
        return run_pack(pack)
    new_options = getattr(be, "run_options", None)
    if not budget or new_options is None:
        return be.run(pack.features, pack.neighbors, pack.slide_offsets)
    options = new_options()
    fired = threading.Event()

    def cancel() -> None:
        fired.set()
        options.terminate = True

    watchdog = threading.Timer(budget, cancel)
    watchdog.daemon = True
    watchdog.start()
    try:
        return be.run(pack.features, pack.neighbors, pack.slide_offsets, run_options=options)  # type: ignore[call-arg]
    except Exception:
        if fired.is_set():
            raise _ModelTimeout() from None
        raise
    finally:
        watchdog.cancel()


def run_pack(be: Backend, pack: Pack, budget: float | None = None) -> list[SlideOutcome]:
    """Run one pack; per slide, its outputs or its failure. A pack of several slides that fails in the backend
    is retried slide by slide, so that one slide's failure does not take its neighbours down; so are the slides
    whose outputs are not finite (an overflowing slide isolates itself in the graph's per-slide masking, but an
    older exported graph spreads its NaN over the whole pack): alone, every finite slide gets its outputs. A
    pack cancelled at the slide budget (seconds, ``budget``) is retried slide by slide too, each with the whole
    budget: only a slide that takes longer alone gets its timeout row."""
    try:
        outputs = _call(be, pack, budget)
    except MomkdError:
        raise
    except _ModelTimeout:
        if pack.n_slides == 1:
            return [(pack.entries[0], _failure(pack.entries[0], "timeout",
                                               f"slide took more than {budget:g} s (model)"))]
        return [r for single in pack.singles() for r in run_pack(be, single, budget)]
    except Exception as e:  # noqa: BLE001 - backend errors are the slide's, not the run's
        if pack.n_slides == 1:
            return [(pack.entries[0], _failure(pack.entries[0], "inference",
                                               f"inference failed ({type(e).__name__}: {one_line(str(e), 300)})"))]
        return [r for single in pack.singles() for r in run_pack(be, single, budget)]
    _check_outputs(outputs, pack)
    per_slide = split_outputs(pack, outputs)
    if pack.n_slides == 1 and not _finite(per_slide[0]):
        return [(pack.entries[0], _failure(pack.entries[0], "inference", NON_FINITE_OUTPUT))]
    singles = pack.singles() if not all(map(_finite, per_slide)) else []
    results: list[SlideOutcome] = []
    for b, (entry, out) in enumerate(zip(pack.entries, per_slide)):
        results.extend([(entry, out)] if _finite(out) else run_pack(be, singles[b], budget))
    return results


def _finite(out: dict[str, Any]) -> bool:
    """All of one slide's required outputs are finite (probability, logits, attention, patch score)."""
    return all(bool(np.all(np.isfinite(out[name]))) for name in REQUIRED_OUTPUTS if name in out)


def _failure(entry: Any, code: str, message: str) -> SlideFailure:
    return SlideFailure(entry.meta, code, message, entry.n)


# re-exported for callers that only import the pipeline
__all__ = ["run_inference", "InferenceSummary", "UsageError", "DEFAULT_BATCH_PATCHES", "CPU_BATCH_PATCHES",
           "default_batch_patches", "DEFAULT_WORKERS",
           "DEFAULT_SLIDE_TIMEOUT"]
