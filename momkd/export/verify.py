"""Export verifies itself: the exported graph runs on held-out slides and must match the PyTorch model.

Slides: the test-split slides of the exported fold(s) (``RUN/splits/fold_K.csv`` + the cohort CSV and features
folder named in ``RUN/config.json``); if those are gone, any slide of the cohort's features folder; if the data
is gone altogether, a synthetic batch (said so in the manifest, with a warning). A few slides are packed into
one batch, together with two crops of the first one that hit the graph's edge cases: a 1-patch slide and a
slide with fewer than k+1 patches (neighbour table padded with -1).

Checks: ONNX Runtime (CPU) against the fp32 PyTorch ensemble, max |delta| of every output. fp32: probability
within ``FP32_TOLERANCE`` or the export fails. fp16: within ``FP16_TOLERANCE`` or the export fails; the
deviation and the number of decision flips at the model's threshold are recorded. The TorchScript twin
(``model.pt``) is checked against the same reference.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd.data.batch import OUTPUT_NAMES, GraphSlide, graph_slide, load_graph_slide, pack_slides
from momkd.errors import MomkdError

FP32_TOLERANCE = 1e-4   # max |delta probability|, ONNX (fp32) vs PyTorch
FP16_TOLERANCE = 2e-2   # max |delta probability|, ONNX (fp16 matmuls) vs PyTorch fp32
TORCHSCRIPT_TOLERANCE = 1e-5
DEFAULT_MAX_SLIDES = 4
DEFAULT_MAX_ROWS = 30000  # rows of held-out slides in the verification batch (keeps export quick on a CPU)


class ExportVerificationError(MomkdError):
    """The exported graph does not reproduce the PyTorch model within tolerance."""


# --------------------------------------------------------------------------- finding held-out slides
def _read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV/TSV table as dicts (the cohort module's reader: delimiter by extension or sniffed)."""
    from momkd.data.cohort import read_table

    table = read_table(path)
    return [dict(zip(table.header, cells)) for _, cells in table.rows]


def _slide_path(features_dir: Path, slide_id: str) -> Path | None:
    from momkd.data.cohort import slide_stem

    stem = slide_stem(slide_id)
    for name in (f"{stem}.h5", f"{stem}.hdf5"):
        p = features_dir / name
        if p.is_file():
            return p
    return None


def candidate_slides(run_dir: Path, config: dict[str, Any], folds: Sequence[int]
                     ) -> tuple[list[tuple[str, Path, str]], str, list[str]]:
    """Slides to verify on, best first: ``([(slide_id, path, note)], source, warnings)``.

    ``source`` is ``"test_split"`` (test slides of the exported folds), ``"cohort"`` (any slide of the cohort's
    features folder) or ``"none"``.
    """
    notes: list[str] = []
    data = config.get("data") or {}
    features_dir = Path(data["features"]) if data.get("features") else None
    if features_dir is not None and not features_dir.is_absolute() and not features_dir.exists():
        alt = run_dir / features_dir
        features_dir = alt if alt.exists() else features_dir
    if features_dir is None or not features_dir.is_dir():
        notes.append(f"cohort features folder {features_dir} is gone" if features_dir else
                     "config.json names no features folder")
        return [], "none", notes

    found: list[tuple[str, Path, str]] = []
    cohort_csv = Path(data["cohort"]) if data.get("cohort") else None
    if cohort_csv is not None and cohort_csv.is_file():
        try:
            slides_by_case: dict[str, list[str]] = {}
            for row in _read_rows(cohort_csv):
                if row.get("case_id") and row.get("slide_id"):
                    slides_by_case.setdefault(row["case_id"], []).append(row["slide_id"])
            from momkd.data.cohort import load_splits
            from momkd.train.runfolder import SPLITS

            splits = {s.fold: s for s in load_splits(run_dir / SPLITS)}
            for fold in folds:
                if fold not in splits:
                    notes.append(f"{run_dir / SPLITS} has no fold {fold}")
                    continue
                for case in sorted(splits[fold].test):
                    for slide_id in slides_by_case.get(case, []):
                        path = _slide_path(features_dir, slide_id)
                        if path is not None and all(s != path.stem for s, _, _ in found):
                            found.append((path.stem, path, f"test split of fold {fold}"))
        except (OSError, csv.Error, KeyError, MomkdError) as e:
            notes.append(f"cannot read the cohort/splits ({e})")
    else:
        notes.append(f"cohort CSV {cohort_csv} is gone" if cohort_csv else "config.json names no cohort CSV")
    if found:
        # interleave the folds so every exported fold's test split is represented among the first few
        by_fold: dict[str, list[tuple[str, Path, str]]] = {}
        for item in found:
            by_fold.setdefault(item[2], []).append(item)
        ordered: list[tuple[str, Path, str]] = []
        queues = list(by_fold.values())
        while any(queues):
            for q in queues:
                if q:
                    ordered.append(q.pop(0))
        return ordered, "test_split", notes
    any_slides = sorted(p for p in features_dir.iterdir() if p.suffix in (".h5", ".hdf5") and p.is_file())
    if any_slides:
        notes.append("no test-split slides found; verified on other slides of the cohort")
        return [(p.stem, p, "cohort") for p in any_slides], "cohort", notes
    notes.append(f"no slides in {features_dir}")
    return [], "none", notes


def load_verification_slides(run_dir: Path, config: dict[str, Any], folds: Sequence[int], feature_dim: int, k: int,
                             direction: str, max_slides: int = DEFAULT_MAX_SLIDES,
                             max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0
                             ) -> tuple[list[GraphSlide], str, list[str]]:
    """Read up to ``max_slides`` held-out slides (``max_rows`` rows in all; a bigger slide is cropped to its
    first rows), add the edge-case crops, and fall back to synthetic slides when the data is gone."""
    from momkd.errors import SlideError

    candidates, source, notes = candidate_slides(run_dir, config, folds)
    slides: list[GraphSlide] = []
    rows = 0
    first: GraphSlide | None = None  # the first slide read, whole: source of the edge-case crops
    for slide_id, path, note in candidates:
        if len(slides) >= max_slides or rows >= max_rows:
            break
        try:
            whole = load_graph_slide(path, k, direction, slide_id=slide_id, expected_dim=feature_dim, note=note)
        except SlideError as e:
            notes.append(f"skipped {e}")
            continue
        first = whole if first is None else first
        budget = max_rows - rows
        if whole.n <= budget:
            slides.append(whole)
        elif not slides:   # the first slide alone is too big: crop it (a later one is skipped for a smaller one)
            slides.append(crop(whole, budget, f"{note}, first {budget} of {whole.n} patches", k, direction))
        else:
            continue
        rows += slides[-1].n
    if first is not None:
        for n in sorted({1, max(1, min(k, first.n))}):
            slides.append(crop(first, n, f"edge case: first {n} patch(es) of {first.slide_id}", k, direction,
                               slide_id=f"{first.slide_id}[:{n}]"))
    if not slides:
        source = "synthetic"
        notes.append("cohort data not found: verified on synthetic inputs only (re-export where the cohort is "
                     "available to verify on held-out slides)")
        slides = synthetic_slides(feature_dim, k, direction, seed=seed)
    return slides, source, notes


def crop(slide: GraphSlide, n: int, note: str, k: int, direction: str, slide_id: str | None = None) -> GraphSlide:
    """The slide's first ``n`` patches, with their own neighbour table."""
    if slide.features is None or slide.coords is None:
        raise ValueError(f"slide {slide.slide_id}: cropping needs its features and coords")
    return graph_slide(slide_id or slide.slide_id, slide.features[:n], slide.coords[:n], k, direction, note=note)


def synthetic_slides(feature_dim: int, k: int, direction: str, seed: int = 0,
                     sizes: Sequence[int] = (400, 57, 1, 5)) -> list[GraphSlide]:
    """Random slides (features ~ N(0, 1), patches on a square grid) for when no real data is left."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)[:n]
        coords = (grid * 256).astype(np.int64)
        features = rng.standard_normal((n, feature_dim)).astype(np.float32)
        out.append(graph_slide(f"synthetic_{i}", features, coords, k, direction, note="synthetic"))
    return out


# --------------------------------------------------------------------------- running and comparing
def torch_outputs(module: Any, features: np.ndarray, neighbors: np.ndarray, offsets: np.ndarray
                  ) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(torch.from_numpy(features), torch.from_numpy(neighbors), torch.from_numpy(offsets))
    if isinstance(out, dict):
        return {k: out[k].detach().float().numpy() for k in OUTPUT_NAMES}
    return {k: v.detach().float().numpy() for k, v in zip(OUTPUT_NAMES, out)}


def onnx_outputs(path: Path, features: np.ndarray, neighbors: np.ndarray, offsets: np.ndarray
                 ) -> tuple[dict[str, np.ndarray], str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        values = session.run(list(OUTPUT_NAMES),
                             {"features": features, "neighbors": neighbors, "slide_offsets": offsets})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = " ".join(str(e).split())[:240]
        raise ExportVerificationError(f"onnxruntime {ort.__version__} cannot run the exported model ({msg}); "
                                      "a lower --opset may help") from None
    return dict(zip(OUTPUT_NAMES, values)), f"onnxruntime {ort.__version__} {session.get_providers()[0]}"


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """Max |delta| per output, decision flips at ``threshold``, and whether ``other`` is finite."""
    diffs = {}
    finite = True
    for name in OUTPUT_NAMES:
        a, b = np.asarray(reference[name], np.float64), np.asarray(other[name], np.float64)
        if a.shape != b.shape:
            raise ExportVerificationError(f"exported model's {name} has shape {b.shape}, PyTorch's {a.shape}")
        finite &= bool(np.isfinite(b).all())
        diffs[name] = float(np.abs(a - b).max()) if a.size else 0.0
    flips = int(np.sum((reference["probability"] >= threshold) != (other["probability"] >= threshold)))
    return {"max_abs_diff": diffs, "decision_flips": flips, "finite": finite}


def attention_sums_ok(attention: np.ndarray, offsets: np.ndarray, atol: float = 1e-3) -> bool:
    sums = np.add.reduceat(attention.astype(np.float64), offsets[:-1]) if len(offsets) > 1 else np.zeros(0)
    return bool(np.allclose(sums, 1.0, atol=atol))


def verify_export(reference_module: Any, onnx_path: Path, torchscript_path: Path | None, slides: list[GraphSlide],
                  source: str, notes: list[str], threshold: float, precision: str = "fp32",
                  extra: dict[str, Callable[..., dict[str, np.ndarray]]] | None = None) -> dict[str, Any]:
    """Run every artifact on the packed verification batch against ``reference_module`` (fp32 PyTorch).

    Raises ``ExportVerificationError`` when ONNX (fp32: ``FP32_TOLERANCE``, fp16: ``FP16_TOLERANCE``) or the
    TorchScript twin (``TORCHSCRIPT_TOLERANCE``) deviate, or produce non-finite outputs. Returns the manifest's
    ``verification`` section.
    """
    pack = pack_slides(slides)
    features, neighbors, offsets = pack.features, pack.neighbors, pack.slide_offsets
    reference = torch_outputs(reference_module, features, neighbors, offsets)
    result: dict[str, Any] = {
        "source": source,
        "reference": "PyTorch eager fp32 (the fold models' forward_wsi, mean over folds)",
        "n_slides": len(slides),
        "n_rows": int(offsets[-1]),
        "neighbor_width": int(neighbors.shape[1]),
        "slides": [{"slide_id": s.slide_id, "n_patches": s.n, "note": s.note} for s in slides],
        "threshold": float(threshold),
        "warnings": list(notes) if source == "synthetic" else [],
        "notes": [] if source == "synthetic" else list(notes),
    }
    if not attention_sums_ok(reference["attention"], offsets):
        raise ExportVerificationError("PyTorch ensemble's attention does not sum to 1 within each slide")

    onnx_out, backend = onnx_outputs(onnx_path, features, neighbors, offsets)
    tol = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    check = compare(reference, onnx_out, threshold)
    check.update({"precision": precision, "backend": backend, "tolerance_probability": tol})
    check["passed"] = bool(check["finite"] and check["max_abs_diff"]["probability"] <= tol
                           and attention_sums_ok(onnx_out["attention"], offsets))
    result["onnx"] = check
    if not check["passed"]:
        why = "non-finite outputs" if not check["finite"] else (
            f"max |delta probability| {check['max_abs_diff']['probability']:.3g} > {tol:g}"
            if check["max_abs_diff"]["probability"] > tol else "attention does not sum to 1 per slide")
        raise ExportVerificationError(f"exported ONNX model ({precision}) does not match the PyTorch model on "
                                      f"{len(slides)} {source.replace('_', '-')} slides: {why}")
    if precision != "fp32" and check["decision_flips"]:
        msg = (f"{precision}: {check['decision_flips']} of {len(slides)} verification slides change decision at "
               f"threshold {threshold:.3f}")
        result["warnings"].append(msg)

    if torchscript_path is not None:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.load(str(torchscript_path), map_location="cpu").eval()
        ts_check = compare(reference, torch_outputs(ts, features, neighbors, offsets), threshold)
        ts_check["tolerance_probability"] = TORCHSCRIPT_TOLERANCE
        ts_check["passed"] = bool(ts_check["finite"]
                                  and ts_check["max_abs_diff"]["probability"] <= TORCHSCRIPT_TOLERANCE)
        result["torch"] = ts_check
        if not ts_check["passed"]:
            raise ExportVerificationError(
                f"TorchScript model does not match the PyTorch model: max |delta probability| "
                f"{ts_check['max_abs_diff']['probability']:.3g} > {TORCHSCRIPT_TOLERANCE:g}")

    for name, run in (extra or {}).items():
        other = compare(reference, run(features, neighbors, offsets), threshold)
        result[name] = other
    result["passed"] = True
    return result
