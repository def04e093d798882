"""``run_inference``: a folder of ``.h5`` slide files -> ``OUT_DIR/predictions.csv`` (+ attention files).

Three stages overlap::

    reader pool, threads or processes (read + validate + neighbour table; file order; read-ahead bounded by bytes)
        -> calling thread (packs up to the row budget, copied into one of two reused buffers)
            -> compute thread (backend.run; rows and attention written; predictions.csv rewritten atomically
               after each pack)

Per-slide problems (every SlideError, duplicates, a slide over the engine's row limit, a backend failure on one
slide, a non-finite output) become ``status=error`` rows and the run goes on. Model/usage problems raise a
``MomkdError`` before anything is written (or, for a model whose outputs break the contract, stop the run
after writing the rows finished so far).
"""

from __future__ import annotations

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
from .backends import Backend, select_backend
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
    if batch_patches < 1:
        raise UsageError(f"--batch-patches must be >= 1, got {batch_patches}")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if reader not in POOLS:
        raise UsageError(f"--reader must be one of {', '.join(POOLS)}, got {reader!r}")
    folder_p, out_p = _check_paths(Path(folder), Path(out_dir))
    manifest = load_manifest(model_dir, verify_checksums=True)
    _check_graph_library(manifest, say)
    painter = (HeatmapWriter(out_p, heatmaps, manifest.model.class_names[1], say) if heatmaps is not None
               else None)
    files = discover_slides(folder_p, recursive=recursive)
    if not files:
        say(f"note: no .h5 files found in {folder}" + ("" if recursive else " (use --recursive for subfolders)"))
    kept = _kept_rows(out_p, folder_p, files, manifest, save_attention, painter is not None) if resume else {}
    if not resume and (out_p / PREDICTIONS).exists():
        say(f"note: replacing {out_p / PREDICTIONS} from an earlier run (--resume keeps its finished rows)")
    be = backend_obj if backend_obj is not None else select_backend(backend, device, manifest, log=say, threads=threads)

    out_p.mkdir(parents=True, exist_ok=True)
    writer = ResultsWriter(out_p, len(files))
    for index, row in kept.items():
        writer.set(index, row)
    if painter is not None:
        painter.start()
        for row in kept.values():
            painter.keep(row.slide_id)
    writer.flush()   # from here on predictions.csv never holds rows of another run that run.json cannot vouch for
    write_run_info(out_p, {
        "momkd_version": __version__, "model_dir": str(Path(model_dir).resolve()),
        "model_manifest_sha256": manifest.sha256, "input_folder": str(folder_p), "recursive": recursive,
        "backend": be.name, "device": be.device, "detail": be.detail,
        "files": {f.rel: file_stamp(f.path) for f in files},
    })
    todo = [f for f in files if f.index not in kept]
    total = len(files)
    counts = {"ok": len(kept), "failed": 0}
    timings = {"read_s": 0.0, "graph_s": 0.0, "compute_s": 0.0, "wait_s": 0.0, "idle_s": 0.0}
    pool = resolve_pool(reader, be.device)
    setup_s = time.perf_counter() - t_setup

    def report() -> None:
        if progress is not None:
            progress(counts["ok"] + counts["failed"], total, counts["ok"], counts["failed"])

    report()
    t0 = time.perf_counter()
    finished = False
    try:
        if todo:
            _run(todo, manifest, be, writer, out_p, counts, timings, report, say, batch_patches, workers,
                 save_attention, pool, painter)
        writer.flush()
        finished = True
    finally:
        if backend_obj is None:
            be.close()
        painted = painter.close(cancel=not finished) if painter is not None else None
    elapsed = time.perf_counter() - t0
    return InferenceSummary(n_files=total, n_ok=writer.n_ok, n_failed=writer.n_failed, n_kept=len(kept), reader=pool,
                            n_processed=len(todo), elapsed_s=elapsed, setup_s=setup_s, backend=be.name,
                            device=be.device, detail=be.detail, predictions_path=out_p / PREDICTIONS, timings=timings,
                            heatmaps=painted)


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


def _run(todo: list[SlideFile], manifest: Manifest, be: Backend, writer: ResultsWriter, out_p: Path,
         counts: dict[str, int], timings: dict[str, float], report: Callable[[], None], say: Callable[[str], None],
         batch_patches: int, workers: int, save_attention: bool, pool: str, painter: HeatmapWriter | None) -> None:
    """The calling thread takes slides in file order from the reader threads and packs them (copying into one of
    two reused buffers); a compute thread runs each pack through the backend and records its rows, so packing,
    copying and writing overlap the compute. Packs depend on file order, slide sizes and the row budget only
    (never on timing): the same folder and budget give the same packs and bit-identical outputs run after run."""
    model = manifest.model
    max_rows = min(batch_patches, be.max_rows) if be.max_rows else batch_patches
    max_width = getattr(be, "max_width", None)
    cfg = ReaderConfig(feature_dim=model.feature_dim, k=model.k, direction=model.graph_direction,
                       keep_coords=save_attention or painter is not None)
    reader = SlideReader(todo, cfg, workers=workers, max_inflight=64, pool=pool,
                         max_inflight_bytes=max(max_rows * model.feature_dim * 4, 64 << 20))
    stop = threading.Event()
    packer = Packer(max_rows, be.max_slides, BufferPool(max_rows, max_buffers=2, stop=stop), ramp=RAMP)
    lock = threading.RLock()            # rows, counts, CSV, progress: shared by the two threads
    packs: queue.Queue[Pack | None] = queue.Queue(maxsize=1)
    crashed: list[BaseException] = []

    def record_failure(f: SlideFailure) -> None:
        with lock:
            _record_failure(f, writer, counts, say, out_p, save_attention, painter)
            report()

    def compute() -> None:
        while True:
            ti = time.perf_counter()
            try:
                pack = packs.get(timeout=0.05)
            except queue.Empty:
                timings["idle_s"] += time.perf_counter() - ti
                if stop.is_set():
                    return
                continue
            timings["idle_s"] += time.perf_counter() - ti
            if pack is None:
                return
            if stop.is_set():          # interrupted: start nothing new
                pack.release()
                return
            try:
                tc = time.perf_counter()
                results = _run_pack(be, pack)
                timings["compute_s"] += time.perf_counter() - tc
                pack.release()
                with lock:
                    for entry, out in results:
                        file: SlideFile = entry.meta
                        if isinstance(out, str):
                            _record_failure(SlideFailure(file, "inference", out, entry.n), writer, counts, say,
                                            out_p, save_attention, painter)
                            continue
                        p = float(out["probability"])
                        pred = model.class_names[1] if p >= model.threshold else model.class_names[0]
                        writer.set(file.index, ResultRow.ok(file.slide_id, file.rel, entry.n, p, pred))
                        counts["ok"] += 1
                        if save_attention:
                            write_attention(out_p, file.slide_id, entry.coords, out["attention"],
                                            out["patch_score"], source=str(file.path), probability=p,
                                            model_sha256=manifest.sha256)
                        if painter is not None:
                            painter.submit(file.slide_id, file.path, entry.coords, out, p, pred)
                    writer.flush()
                    report()
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                pack.release()
                crashed.append(e)
                stop.set()
                return

    def submit(pack: Pack | None) -> None:
        while True:
            if stop.is_set():
                if pack is not None:
                    pack.release()
                raise PoolClosed()
            try:
                packs.put(pack, timeout=0.05)
                return
            except queue.Full:
                continue

    def add(item: GraphSlide | SlideFailure) -> None:
        if isinstance(item, GraphSlide):
            timings["read_s"] += item.read_s
            timings["graph_s"] += item.graph_s
            limit = None
            if be.max_rows and item.n > be.max_rows:
                limit = f"slide has {item.n} patches, more than the {be.name} engine's maximum of {be.max_rows}"
            elif max_width and item.neighbors.shape[1] > max_width:
                limit = (f"neighbour table is {item.neighbors.shape[1]} wide, more than the {be.name} engine's "
                         f"maximum of {max_width}")
            if limit is None:
                for pack in packer.add(item):
                    submit(pack)
                return
            item = SlideFailure(item.meta, "too_large", limit + " (use --backend onnxruntime)", item.n)
        record_failure(item)

    worker = threading.Thread(target=compute, name="momkd-compute", daemon=True)
    worker.start()
    try:
        try:
            while not reader.exhausted:
                tw = time.perf_counter()
                item = reader.take()                 # the next slide in file order (waits if not read yet)
                timings["wait_s"] += time.perf_counter() - tw
                add(item)
            last = packer.finish()
            if last is not None:
                submit(last)
            submit(None)
        except PoolClosed:  # the run is stopping (the compute worker failed): its error is raised below
            pass
        worker.join()
    finally:
        stop.set()
        reader.close()
        worker.join(timeout=60)     # an interrupted run lets the pack in flight finish and be written
        with lock:
            writer.flush()
    if crashed:
        raise crashed[0]


def _record_failure(f: SlideFailure, writer: ResultsWriter, counts: dict[str, int], say: Callable[[str], None],
                    out_p: Path, save_attention: bool, painter: HeatmapWriter | None) -> None:
    writer.set(f.file.index, ResultRow.failed(f.file.slide_id, f.file.rel, f"{f.code}: {f.message}", f.n_patches))
    counts["failed"] += 1
    say(f"failed: {f.file.rel}: {f.code}: {f.message}")
    if f.code != "duplicate":   # never leave an older run's attention or heatmap for a failed slide
        if save_attention:
            attention_path(out_p, f.file.slide_id).unlink(missing_ok=True)
        if painter is not None:
            painter.discard(f.file.slide_id)


def _check_outputs(outputs: dict[str, np.ndarray], pack: Pack) -> None:
    problem = check_output_shapes(outputs, pack, ("probability", "attention", "patch_score"))
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
