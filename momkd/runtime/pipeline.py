"""``run_inference``: a folder of ``.h5`` slide files -> ``OUT_DIR/predictions.csv`` (+ attention files).

Three stages overlap::

    reader pool, threads or processes (read + validate + neighbour table; file order; read-ahead bounded by bytes)
        -> calling thread (packs up to the row budget, copied into one of two reused buffers)
            -> compute thread (backend.run; attention written; the pack's rows appended to predictions.csv and
               fsynced; the whole file rewritten atomically, in file order, once at the end: see ``results``)

Per-slide problems (every SlideError, duplicates, a slide over the engine's row limit, a backend failure on one
slide, a non-finite output) become ``status=error`` rows and the run goes on. Model/usage problems raise a
``MomkdError`` before anything is written (or, for a model whose outputs break the contract, stop the run
after writing the rows finished so far).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from momkd import __version__
from momkd.errors import ModelFolderError, MomkdError
from momkd.manifest import Manifest, load_manifest

from .attention_io import attention_path, write_attention
from .backends import REQUIRED_OUTPUTS, Backend, select_backend
from .discover import SlideFile, discover_slides
from .heatmap_writer import HeatmapOptions, HeatmapReport, HeatmapWriter, heatmap_path
from momkd.data.batch import GraphSlide, Pack, check_output_shapes, split_outputs

from .packing import BufferPool, Packer, PoolClosed
from .reader import POOLS, ReaderConfig, SlideFailure, SlideReader, one_line, resolve_pool
from .results import (PREDICTIONS, ResultRow, ResultsError, ResultsWriter, file_stamp, read_predictions,
                      read_run_info, write_run_info)

DEFAULT_BATCH_PATCHES = 32_768   # rows per pack: ~16k+ rows keep a CPU or GPU busy; 2 buffers = 400 MB at D=1536
DEFAULT_WORKERS = 2
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
                f"({self.backend}, {self.device}) -> {self.predictions_path}{heatmaps}")


ProgressFn = Callable[[int, int, int, int], None]   # (done, total, ok, failed)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_options(batch_patches: int, workers: int, reader: str) -> None:
    if batch_patches < 1:
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
    stamps = info.get("files") or {}
    by_rel = {f.rel: f for f in files}
    kept = {}
    for row in read_predictions(pred):
        f = by_rel.get(row.file)
        if (row.status == "ok" and f is not None and f.duplicate_of is None and f.index not in kept
                and row.slide_id == f.slide_id and stamps.get(f.rel) == file_stamp(f.path)
                and (not save_attention or attention_path(out_dir, f.slide_id).is_file())
                and (not heatmaps or heatmap_path(out_dir, f.slide_id).is_file())):
            kept[f.index] = row
    return kept


def run_inference(model_dir: str | Path, folder: str | Path, out_dir: str | Path, *, backend: str = "auto",
                  device: str | None = None, recursive: bool = False,
                  batch_patches: int = DEFAULT_BATCH_PATCHES, workers: int = DEFAULT_WORKERS,
                  resume: bool = False, save_attention: bool = False, progress: ProgressFn | None = None,
                  log: Callable[[str], None] | None = None, threads: int | None = None,
                  reader: str = "auto", backend_obj: Backend | None = None,
                  heatmaps: HeatmapOptions | None = None) -> InferenceSummary:
    """Predict every ``.h5`` slide file in ``folder`` with the model folder ``model_dir``; write ``out_dir``.

    ``backend``: auto | onnxruntime | tensorrt | torch; ``device``: None (best available) | cpu | cuda[:N];
    ``batch_patches``: row budget of one backend call (a larger slide runs alone); ``workers``: readers;
    ``reader``: auto | threads | processes (auto: processes when the backend runs on a GPU, else threads);
    ``resume``: keep the ok rows of an earlier run in ``out_dir`` (same model, unchanged file) and do the rest;
    ``progress(done, total, ok, failed)`` and ``log(message)`` are called from the pipeline's threads, one call
    at a time (``log`` gets one-line notes and ``failed: FILE: CODE: MESSAGE`` lines).
    ``backend_obj``: an already built backend (benchmarks), instead of ``backend``/``device``.
    ``heatmaps``: also render ``out_dir/heatmaps/{slide_id}.png`` for every ok slide (needs matplotlib; see
    ``heatmap_writer``); a heatmap that fails is recorded and the run goes on.

    Raises ``MomkdError`` subclasses (ModelFolderError, BackendError, ResultsError, UsageError) for problems that
    are not one slide's; returns the summary otherwise (``summary.exit_code``: 0 all ok, 1 some failed).
    """
    t_setup = time.perf_counter()
    say = log or (lambda _m: None)
    _check_options(batch_patches, workers, reader)
    folder_p, out_p = _check_paths(Path(folder), Path(out_dir))
    manifest = _load_model(model_dir, say)
    painter = (HeatmapWriter(out_p, heatmaps, manifest.model.class_names[1], say) if heatmaps is not None
               else None)
    files = _discover(folder_p, str(folder), recursive, say)
    kept = _resume_rows(resume, out_p, folder_p, files, manifest, save_attention, painter is not None, say)
    be = backend_obj if backend_obj is not None else select_backend(backend, device, manifest, log=say, threads=threads)
    writer = _start_results(out_p, files, kept, painter)
    write_run_info(out_p, _run_info(model_dir, manifest, folder_p, recursive, be, files))
    run = InferenceRun([f for f in files if f.index not in kept], manifest, be, writer, out_p, painter, say,
                       progress, total=len(files), n_kept=len(kept), batch_patches=batch_patches, workers=workers,
                       save_attention=save_attention, pool=resolve_pool(reader, be.device))
    setup_s = time.perf_counter() - t_setup
    elapsed, painted = _execute(run, close_backend=backend_obj is None)
    return _summary(run, elapsed, setup_s, painted)


def _load_model(model_dir: str | Path, say: Callable[[str], None]) -> Manifest:
    """The model folder's manifest (checksums verified) and the graph library it needs."""
    manifest = load_manifest(model_dir, verify_checksums=True)
    _check_graph_library(manifest, say)
    return manifest


def _check_graph_library(manifest: Manifest, say: Callable[[str], None]) -> None:
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
    files = discover_slides(folder_p, recursive=recursive)
    if not files:
        say(f"note: no .h5 files found in {folder}" + ("" if recursive else " (use --recursive for subfolders)"))
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
    """Create the output folder and replace predictions.csv by the kept rows (atomically, before run.json)."""
    out_p.mkdir(parents=True, exist_ok=True)
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
                           keep_coords=self.save_attention or self.painter is not None)
        self.reader = SlideReader(self.todo, cfg, workers=self.workers, max_inflight=64, pool=self.pool,
                                  max_inflight_bytes=max(self.max_rows * model.feature_dim * 4, 64 << 20))
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
                results = _run_pack(self.be, pack)
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

    def record_results(self, results: list[tuple[Any, dict[str, Any] | str]]) -> None:
        """One pack's outcomes: rows (and attention files, heatmaps); the new rows appended to the CSV."""
        with self.lock:
            for entry, out in results:
                if isinstance(out, str):
                    self._fail(SlideFailure(entry.meta, "inference", out, entry.n))
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
        self.writer.set(file.index, ResultRow.ok(file.slide_id, file.rel, entry.n, p, pred))
        self.counts["ok"] += 1
        if self.save_attention:
            write_attention(self.out_p, file.slide_id, entry.coords, out["attention"], out["patch_score"],
                            source=str(file.path), probability=p, model_sha256=self.manifest.sha256)
        if self.painter is not None:
            self.painter.submit(file.slide_id, file.path, entry.coords, out, p, pred)

    def _fail(self, f: SlideFailure) -> None:
        self.writer.set(f.file.index,
                        ResultRow.failed(f.file.slide_id, f.file.rel, f"{f.code}: {f.message}", f.n_patches))
        self.counts["failed"] += 1
        self.say(f"failed: {f.file.rel}: {f.code}: {f.message}")
        if f.code != "duplicate":   # never leave an older run's attention or heatmap for a failed slide
            if self.save_attention:
                attention_path(self.out_p, f.file.slide_id).unlink(missing_ok=True)
            if self.painter is not None:
                self.painter.discard(f.file.slide_id)


def _check_outputs(outputs: dict[str, np.ndarray], pack: Pack) -> None:
    problem = check_output_shapes(outputs, pack, REQUIRED_OUTPUTS)
    if problem is not None:
        raise ModelFolderError(problem)


def _run_pack(be: Backend, pack: Pack) -> list[tuple[Any, dict[str, Any] | str]]:
    """Run one pack; per slide, its outputs or an error message. A failing pack of several slides is retried
    slide by slide so that one slide's failure does not take its neighbours down."""
    try:
        outputs = be.run(pack.features, pack.neighbors, pack.slide_offsets)
    except MomkdError:
        raise
    except Exception as e:  # noqa: BLE001 - backend errors are the slide's, not the run's
        if pack.n_slides == 1:
            return [(pack.entries[0], f"inference failed ({type(e).__name__}: {one_line(str(e), 300)})")]
        return [r for single in pack.singles() for r in _run_pack(be, single)]
    _check_outputs(outputs, pack)
    results: list[tuple[Any, dict[str, Any] | str]] = []
    for entry, out in zip(pack.entries, split_outputs(pack, outputs)):
        if not np.isfinite(out["probability"]):
            results.append((entry, "the model's probability is not finite (NaN/Inf)"))
        elif not np.all(np.isfinite(out["attention"])):
            results.append((entry, "the model's attention is not finite (NaN/Inf)"))
        else:
            results.append((entry, out))
    return results


# re-exported for callers that only import the pipeline
__all__ = ["run_inference", "InferenceSummary", "UsageError", "DEFAULT_BATCH_PATCHES", "DEFAULT_WORKERS"]
