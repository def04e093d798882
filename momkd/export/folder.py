"""``export_run``: a finished training run -> a deployable, self-verified model folder.

Folder layout::

    MODEL_DIR/model.onnx      single-file ONNX graph (fp32, or fp16 matmuls with fp32 I/O for --fp16)
    MODEL_DIR/model.int8.onnx int8 twin of model.onnx (--precision int8; written only when its accuracy gates pass)
    MODEL_DIR/model.pt        TorchScript twin (torch.jit.trace of the same fp32 frozen module), for the torch backend
    MODEL_DIR/model.plan      TensorRT engine (--format trt) + timing.cache beside it
    MODEL_DIR/manifest.json   what the runtime needs to trust and run the folder (momkd.manifest)

The folder is assembled in a temporary sibling folder and moved into place only after verification passed,
so a failed export never leaves a half-written model folder behind.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from momkd.atomic import current_umask
from momkd.errors import MomkdError, RunFolderError
from momkd.export.gates import GateError
from momkd.export.quantize import add_reduced_graphs, check_precisions
from momkd.graph import sklearn_version

ONNX_NAME = "model.onnx"
TORCH_NAME = "model.pt"
MODEL_FORMATS = ("onnx", "trt")                 # what export_run writes: a model folder
FORMATS = MODEL_FORMATS + ("triton",)           # `momkd export --format`: triton, a repository (export.triton_repo)


class ModelDirExistsError(MomkdError):
    """The output folder already holds something and overwriting was not asked for."""


def _parse_fold(fold: int | str | None) -> int | None:
    if fold is None or (isinstance(fold, str) and fold.strip().lower() == "all"):
        return None
    try:
        value = int(fold)
    except (TypeError, ValueError):
        raise RunFolderError(f"--fold must be 'all' or a fold number, got {fold!r}") from None
    if value < 0:
        raise RunFolderError(f"--fold must be 'all' or a fold number >= 0, got {value}")
    return value


def _cv_metrics(run: Any) -> dict[str, Any]:
    """The run's cross-validation metrics as summary.json has them: per case (``mean``/``std``, fold ``val``/
    ``test``) and per slide (``mean_slide``/``std_slide``, fold ``val_slide``/``test_slide``; the paper's Table 1
    definition), empty where an older run lacks them."""
    summary = run.summary
    out: dict[str, Any] = {key: summary.get(key, {}) for key in ("mean", "std", "mean_slide", "std_slide")}
    out["n_folds"] = len(summary.get("folds", []))
    per_fold = {}
    for fold in run.folds:
        record = run.fold_records.get(fold)
        if record:
            per_fold[str(fold)] = {"threshold": record.get("threshold"),
                                   **{key: record.get(key) for key in ("val", "test", "val_slide", "test_slide")}}
    out["folds"] = per_fold
    return out


def _publishable(folder: Path) -> None:
    """Ordinary permissions (0755 folder, 0644 files under the usual umask): the temporary folder and the atomic
    manifest write start private, but a model folder is meant to be read by the service that runs it."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


# The hidden folders beside the model folder NAME: ``.NAME.export-<tempfile's random suffix>`` while an export
# writes, ``.NAME.replaced-<the same suffix>`` for the old folder during the final swap.
WORK_INFIX, REPLACED_INFIX = ".export-", ".replaced-"


def _lock_folder(path: Path) -> int | None:
    """A non-blocking exclusive ``flock`` on the folder ``path`` itself (it follows the folder through renames and
    leaves no file behind): the open descriptor, or ``None`` when another process holds it or this system or
    filesystem has no flock."""
    try:
        import fcntl
    except ImportError:   # not POSIX
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:       # held by a live export (BlockingIOError), or no locks here (ENOLCK, EOPNOTSUPP, ...)
        os.close(fd)
        return None
    return fd


def remove_stale_work(out_dir: Path, say: Callable[[str], None]) -> list[Path]:
    """Remove the hidden work folders that killed exports to ``out_dir`` left beside it (``kill -9``, power loss):
    those whose folder lock (:func:`_lock_folder`, held by every export for its whole run) can be taken. A live
    export's folder is never touched. Returns the folders removed."""
    removed = []
    for work in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}{WORK_INFIX}*")):
        fd = _lock_folder(work) if work.is_dir() and not work.is_symlink() else None
        if fd is None:
            continue
        try:
            shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(work)
        say(f"removed {work} (left by an export that was killed)")
    return removed


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ModelDirExistsError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise ModelDirExistsError(f"{out_dir}: folder is not empty; choose another --out or pass --overwrite")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    fmt: str = "onnx",
    fold: int | str | None = "all",
    fp16: bool = False,
    opset: int = 18,
    *,
    overwrite: bool = False,
    max_slides: int = 4,
    max_rows: int = 30000,
    profile: Any = None,
    log: Callable[[str], None] | None = None,
    precisions: Sequence[str] = ("fp32",),
    gate_limits: Any = None,
    force_precision: bool = False,
) -> dict[str, Any]:
    """Freeze ``run_dir`` (every fold, or fold ``fold``) into ``out_dir``; returns the manifest written.

    ``fmt="trt"`` additionally builds a TensorRT engine from the same ONNX graph; without TensorRT it raises
    ``TensorRTUnavailableError`` after the ONNX folder has been written. Raises ``RunFolderError`` for a
    missing/unfinished run, ``ExportError``/``ExportVerificationError`` when the graph breaks its contract.
    ``precisions``: also ``"int8"`` for ``model.int8.onnx`` (``momkd.export.quantize``), gated against fp32 by
    ``gate_limits`` (``momkd.export.gates.GateLimits``); a failing graph is not written and ``GateError`` is raised
    after the rest of the folder is, unless ``force_precision``.
    """
    from momkd.runtime.cpu import apply_thread_environment

    apply_thread_environment()   # before torch is imported: OpenMP threads = usable CPUs, no spin-waiting
    from momkd.export.frozen import load_run
    from momkd.export.onnx import check_opset
    from momkd.manifest import load_manifest, write_manifest

    say = log or (lambda msg: None)
    if fmt not in MODEL_FORMATS:
        raise MomkdError(f"--format must be one of {', '.join(MODEL_FORMATS)}, got {fmt!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    which = _parse_fold(fold)
    check_opset(opset)
    if check_precisions(precisions) and fp16:
        raise MomkdError("--precision int8 is made from the fp32 graph: drop --fp16")
    _prepare_out(out_dir, overwrite)
    t0 = time.perf_counter()
    run = load_run(run_dir, "all" if which is None else which)
    say(f"loaded {len(run.models)} fold model(s) {run.folds} from {run_dir} "
        f"({run.model_config.get('model', 'momkd')}, {run.preset} preset, k={run.k}, {run.graph_direction} graph)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work(out_dir, say)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{WORK_INFIX}", dir=out_dir.parent))
    work_lock = _lock_folder(work)   # held until the folder is published or removed: see remove_stale_work
    try:
        io, graph_report = _write_graphs(work, run, fp16, opset, say)
        slides, verification = _verify(work, run, run_dir, fp16, max_slides, max_rows, say)
        verification["graph_ops"] = graph_report["ops"]
        manifest = _manifest(run, run_dir, io, graph_report, verification, fp16, opset)
        gate_failures = add_reduced_graphs(work, ONNX_NAME, run, run_dir, manifest, precisions, gate_limits,
                                           force_precision, slides, say)
        write_manifest(work, manifest)
        _publishable(work)
        if out_dir.exists():   # moved aside in one rename: a kill never leaves a half-deleted model folder
            replaced = work.with_name(work.name.replace(WORK_INFIX, REPLACED_INFIX, 1))
            out_dir.rename(replaced)
            work.rename(out_dir)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if work_lock is not None:
            os.close(work_lock)
    say(f"wrote {out_dir} ({time.perf_counter() - t0:.1f} s)")
    if fmt == "trt":
        _add_tensorrt(out_dir, run, run.ensemble(), slides, fp16, profile, say)
    if gate_failures:
        raise GateError(f"{out_dir}: reduced-precision graph not written, its accuracy gates failed ("
                        + "; ".join(gate_failures) + "); the fp32 model folder is valid (--force-precision writes "
                        "it anyway, recorded in the manifest)")
    return load_manifest(out_dir, verify_checksums=False).raw   # written and checked just now


def _write_graphs(work: Path, run: Any, fp16: bool, opset: int, say: Callable[[str], None]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model.onnx`` (the dense-GATv2 ensemble, linear layers in fp16 with ``fp16``) and the TorchScript twin
    ``model.pt`` into ``work``; returns the graph's I/O spec and its check report."""
    import torch

    from momkd.export.frozen import mixed_fp16
    from momkd.export.onnx import export_onnx, trace_torchscript

    graph_ensemble = run.export_ensemble()  # dense GATv2 (the same module unless the run used PyG's layer)
    with torch.no_grad():
        t1 = time.perf_counter()
        module = mixed_fp16(graph_ensemble) if fp16 else graph_ensemble
        say(f"exporting {len(run.models)} fold model(s) to {ONNX_NAME} with torch.onnx (the longest step)")
        io, report = export_onnx(module, work / ONNX_NAME, run.feature_dim, run.k, opset=opset)
        say(f"exported {ONNX_NAME} (opset {report['opset']}, {sum(report['ops'].values())} nodes, "
            f"{report['bytes'] / 1e6:.1f} MB{', fp16 matmuls' if fp16 else ''}, {time.perf_counter() - t1:.1f} s)")
        say(f"tracing {TORCH_NAME} (TorchScript)")
        trace_torchscript(graph_ensemble, work / TORCH_NAME, run.feature_dim, run.k)
    return io, report


def _verify(work: Path, run: Any, run_dir: Path, fp16: bool, max_slides: int, max_rows: int,
            say: Callable[[str], None]) -> tuple[list[Any], dict[str, Any]]:
    """Both artifacts in ``work`` against the fold models as trained, on held-out slides; returns the slides and
    the manifest's ``verification`` section (``ExportVerificationError`` when they deviate)."""
    import torch

    from momkd.export.verify import load_verification_slides, verify_export

    t1 = time.perf_counter()
    say(f"verifying {ONNX_NAME} and {TORCH_NAME} against the PyTorch fold models on held-out slides")
    with torch.no_grad():
        slides, source, notes = load_verification_slides(
            run_dir, run.config, run.folds, run.feature_dim, run.k, run.graph_direction,
            max_slides=max_slides, max_rows=max_rows)
        verification = verify_export(run.ensemble(), work / ONNX_NAME, work / TORCH_NAME, slides, source, notes,
                                     run.threshold, precision="fp16" if fp16 else "fp32")
    if fp16:
        verification["fp16_method"] = ("every linear layer (F.linear) in fp16 with fp16 weights; GATv2 attention, "
                                       "LayerNorm, softmax and per-slide pooling in fp32; I/O fp32")
    for w in verification["warnings"]:
        say(f"warning: {w}")
    d = verification["onnx"]["max_abs_diff"]
    say(f"verified on {verification['n_slides']} slides ({source.replace('_', ' ')}, {verification['n_rows']} "
        f"rows): max |delta p| ONNX {d['probability']:.2e}, TorchScript "
        f"{verification['torch']['max_abs_diff']['probability']:.2e}, "
        f"decision flips {verification['onnx']['decision_flips']} ({time.perf_counter() - t1:.1f} s)")
    return slides, verification


def _manifest(run: Any, run_dir: Path, io: dict[str, Any], graph_report: dict[str, Any],
              verification: dict[str, Any], fp16: bool, opset: int) -> dict[str, Any]:
    """The model folder's manifest (``write_manifest`` adds the checksums)."""
    import torch

    return {
        "model": {
            "feature_dim": run.feature_dim,
            "encoder": run.encoder,
            "k": run.k,
            "graph_direction": run.graph_direction,
            "graph_library": {"scikit-learn": sklearn_version()} if run.graph_direction == "official" else None,
            "class_names": run.class_names,
            "threshold": run.threshold,
            "preset": run.preset,
            "folds": list(run.folds),
            "cv_metrics": _cv_metrics(run),
            "architecture": run.model_config.get("model", "momkd"),
            "ensemble": "mean of fold probabilities" if len(run.folds) > 1 else "single fold",
            "source_run": str(run_dir.resolve()),
            "gat_impl": "dense" + (" (converted from the PyG GATv2Conv weights the run trained)"
                                   if run.converted_from_pyg else ""),
        },
        "onnx": {"file": ONNX_NAME, "opset": int(graph_report["opset"] or opset),
                 "precision": "fp16" if fp16 else "fp32", "inputs": io["inputs"], "outputs": io["outputs"],
                 "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}"},
        "tensorrt": None,
        "torch": {"file": TORCH_NAME, "format": "torchscript", "precision": "fp32"},
        "verification": verification,
    }


def _add_tensorrt(out_dir: Path, run: Any, ensemble: Any, slides: list[Any], fp16: bool, profile: Any,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """Build ``model.plan`` from the folder's ONNX graph, verify it on the same slides, update the manifest."""
    from momkd.export.tensorrt import PLAN_NAME, build_engine, default_profile, engine_runner, require_tensorrt
    from momkd.data.batch import pack_slides
    from momkd.export.verify import FP16_TOLERANCE, FP32_TOLERANCE, ExportVerificationError, compare, torch_outputs
    from momkd.manifest import load_manifest, write_manifest

    require_tensorrt(out_dir)
    profile = profile or default_profile(run.k, run.graph_direction)
    say(f"building TensorRT engine ({'fp16' if fp16 else 'fp32'}), profile {profile.to_dict()}")
    t0 = time.perf_counter()
    info = build_engine(out_dir / ONNX_NAME, out_dir / PLAN_NAME, run.feature_dim, profile, fp16=fp16,
                        onnx_written_to=out_dir)
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = dict(load_manifest(out_dir, verify_checksums=False).raw)
    verification = dict(manifest["verification"])

    fits = [s for s in slides if s.n <= profile.rows[2] and s.neighbors.shape[1] <= profile.width[2]]
    pack = pack_slides(fits[: profile.slides[2]])
    features, neighbors, offsets = pack.features, pack.neighbors, pack.slide_offsets
    reference = torch_outputs(ensemble, features, neighbors, offsets)
    check = compare(reference, engine_runner(out_dir / PLAN_NAME)(features, neighbors, offsets),
                    float(manifest["model"]["threshold"]))
    tol = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    check.update({"precision": info["precision"], "backend": f"TensorRT {info['tensorrt_version']} on {info['device']}",
                  "tolerance_probability": tol, "n_slides": len(offsets) - 1, "n_rows": int(offsets[-1])})
    check["passed"] = bool(check["finite"] and check["max_abs_diff"]["probability"] <= tol)
    if not check["passed"]:
        (out_dir / PLAN_NAME).unlink(missing_ok=True)
        raise ExportVerificationError(
            f"TensorRT engine does not match the PyTorch model: max |delta probability| "
            f"{check['max_abs_diff']['probability']:.3g} > {tol:g} (the ONNX model folder in {out_dir} is still valid)")
    say(f"TensorRT engine verified: max |delta p| {check['max_abs_diff']['probability']:.2e}, "
        f"decision flips {check['decision_flips']}")
    verification["tensorrt"] = check
    manifest["tensorrt"] = info
    manifest["verification"] = verification
    manifest["artifacts"] = [n for n in manifest.get("artifacts", {})] + [info["timing_cache"]]
    write_manifest(out_dir, manifest)
    _publishable(out_dir)
    say(f"wrote {out_dir / PLAN_NAME} ({info['build_seconds']} s)")
    return manifest
