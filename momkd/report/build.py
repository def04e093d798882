"""``build_report``: a run folder -> ``OUT/report.md`` (+ ``report.html``), ``OUT/figures/*.png``,
``OUT/cv_table.csv`` and, for MoMKD runs, ``OUT/memory_codes.csv``.

Sections: the cross-validation table (and the comparison with ``--compare`` runs), ROC curves per fold,
per-epoch loss curves, memory dynamics (Fig. 3) and the memory codes' top test patches (Fig. 4, with crops
when whole-slide images and openslide are available). An ABMIL run has no memory: the report says so and
leaves those sections out. Anything a section needs that the run folder lacks is named in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import momkd
from momkd.errors import MomkdError

from momkd.tables import LEGEND, Table, compare_table, cv_table, cv_table_csv

from . import figures
from .document import Block, Figure, Heading, Paragraph, to_html, to_markdown
from momkd.train.runfolder import RunRecord, load_run

if TYPE_CHECKING:
    from .memory_codes import CodeHit

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES = "figures"
CV_CSV = "cv_table.csv"
CODES_CSV = "memory_codes.csv"


class ReportError(MomkdError):
    """The report cannot be written (bad options or output folder)."""


def _figure(blocks: list[Block], path: Path | None, out_dir: Path, caption: str, missing: str) -> None:
    if path is None:
        blocks.append(Paragraph(missing))
    else:
        blocks.append(Figure(path.relative_to(out_dir).as_posix(), caption))


def _run_names(runs: Sequence[RunRecord]) -> list[str]:
    """Folder names, or the full paths where two runs share a folder name."""
    names = [r.name for r in runs]
    return [r.name if names.count(r.name) == 1 else str(r.path) for r in runs]


def _code_tables(hits: list[CodeHit], class_names: tuple[str, str]) -> list[Block]:
    """Per fold: a row per (bank, code), a cell per rank: ``slide (x, y) similarity``."""
    blocks: list[Block] = []
    folds = sorted({h.fold for h in hits})
    for fold in folds:
        mine = [h for h in hits if h.fold == fold]
        k = max(h.rank for h in mine)
        cells: dict[tuple[str, int], list[str]] = {}
        for h in sorted(mine, key=lambda h: (h.bank != "positive", h.code, h.rank)):
            cells.setdefault((h.bank, h.code), []).append(f"{h.slide_id} ({h.x}, {h.y}) {h.similarity:.3f}")
        rows = [(f"{bank} ({class_names[1] if bank == 'positive' else class_names[0]})", str(code), *c)
                for (bank, code), c in cells.items()]
        blocks += [Heading(f"Fold {fold}", 3), Table(("bank", "code", *(f"#{r}" for r in range(1, k + 1))), rows)]
    return blocks


def _memory_sections(run: RunRecord, out_dir: Path, top_k: int, slides_dir: Path | None, device: str,
                     log: Callable[[str], None]) -> list[Block]:
    fig_dir = out_dir / FIGURES
    blocks: list[Block] = [Heading("Memory dynamics (paper Fig. 3)")]
    _figure(blocks, figures.memory_figure(run, fig_dir / "memory_dynamics.png"), out_dir,
            "Active-memory ratio (share of codes that are some patch's nearest code in an epoch) and perplexity "
            "(effective number of codes used) of each bank, per training epoch",
            "No fold has memory statistics in history.csv.")
    blocks.append(Heading("Memory codes: top test patches (paper Fig. 4)"))
    try:
        from .memory_codes import features_folder, hits_csv, top_patches
    except ImportError as e:
        blocks.append(Paragraph(
            f"Left out: computing the codes' patches needs PyTorch (pip install 'momkd[train]'): {e}"))
        return blocks
    scan = top_patches(run, top_k, device, log)
    if scan.hits:
        (out_dir / CODES_CSV).write_text(hits_csv(scan.hits))
        blocks.append(Paragraph(
            f"For every fold, memory bank and code: the {top_k} patches of the fold's test slides whose projection "
            f"F_P-wsi is most similar (cosine) to the code, computed with the fold's checkpoint. Each cell: slide "
            f"(level-0 x, y) similarity. All hits, with the slide labels: {CODES_CSV}."))
        if slides_dir is not None and (features_dir := features_folder(run)) is not None:   # hits need features
            from .crops import crop_montages

            montages, crop_notes = crop_montages(scan.hits, slides_dir, features_dir, fig_dir,
                                                 run.class_names, log)
            blocks += [Figure(p.relative_to(out_dir).as_posix(), caption) for caption, p in montages]
            scan.notes.extend(crop_notes)
        else:
            blocks.append(Paragraph("No patch crops: pass --slides DIR (whole-slide images) with openslide installed."))
        blocks += _code_tables(scan.hits, run.class_names)
    for note in scan.notes:
        blocks.append(Paragraph(f"Note: {note}"))
    return blocks


def build_report(run_dir: str | Path, out_dir: str | Path, *, compare: Sequence[str | Path] = (), top_k: int = 3,
                 slides_dir: str | Path | None = None, device: str = "auto", html: bool = False,
                 log: Callable[[str], None] = lambda _m: None) -> Path:
    """Write the report of ``run_dir`` into ``out_dir``; returns the path of ``report.md``.

    ``compare``: more run folders for the side-by-side table; ``top_k``: patches per memory code;
    ``slides_dir``: whole-slide images for patch crops (needs openslide); ``html``: also ``report.html``.
    Raises ``MomkdError`` (one line naming the file) for a run folder that cannot be read.
    """
    if top_k < 1:
        raise ReportError(f"--top-k must be >= 1, got {top_k}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a folder")
    if slides_dir is not None and not Path(slides_dir).is_dir():
        raise ReportError(f"{slides_dir}: --slides folder does not exist")
    run = load_run(run_dir)
    others = [load_run(p) for p in compare]
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / FIGURES
    summary = run.summary
    (out / CV_CSV).write_text(cv_table_csv(summary))

    blocks: list[Block] = [
        Heading(f"momkd report: {run.name}", 1),
        Paragraph(f"Run folder {run.path.resolve()}: model {run.model}, {summary['preset']} preset, "
                  f"{len(run.folds)} folds; report written by momkd {momkd.__version__}."),
        Heading("Cross-validation (test split, threshold chosen on validation)"),
        Paragraph(f"Test metrics in percent; the values are those of summary.json (full precision in {CV_CSV}). "
                  f"{LEGEND}"),
        cv_table(summary),
    ]
    if others:
        runs = [run, *others]
        blocks += [Heading("Comparison"),
                   Paragraph("Mean ± std over folds of the test metrics (%) of each run (columns as above)."),
                   compare_table(list(zip(_run_names(runs), (r.summary for r in runs))))]
    log("figures: ROC, loss curves")
    blocks.append(Heading("ROC curves per fold"))
    _figure(blocks, figures.roc_figure(run, fig_dir / "roc.png"), out,
            "Case-level test ROC of each fold (mean slide probability per case)",
            "No fold has a test_predictions.csv with both classes: no ROC curves.")
    blocks.append(Heading("Training curves"))
    _figure(blocks, figures.loss_figure(run, fig_dir / "loss.png"), out,
            "Training curves per epoch (loss terms: mean over the epoch's training slides; validation cross-entropy "
            "and AUC dashed), a colour per fold",
            "No fold has a history.csv: no training curves.")
    if run.has_memory:
        blocks += _memory_sections(run, out, top_k, Path(slides_dir) if slides_dir else None, device, log)
    else:
        blocks += [Heading("Memory"),
                   Paragraph(f"This run's model is {run.model}: it has no class memory, so there are no memory "
                             "dynamics (Fig. 3) and no memory-code patches (Fig. 4).")]
    (out / REPORT_MD).write_text(to_markdown(blocks), encoding="utf-8")
    if html:
        (out / REPORT_HTML).write_text(to_html(blocks, f"momkd report: {run.name}", out), encoding="utf-8")
    return out / REPORT_MD
