"""``momkd validate`` and ``momkd synth``: check a cohort, or write a synthetic one."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from momkd.cli.console import CliConsole
from momkd.cli.errors import USAGE_ERROR, handle_errors
from momkd.errors import MomkdError
from momkd.synth import DIFFICULTIES, KINDS

if TYPE_CHECKING:
    SynthKind = str
    SynthDifficulty = str
else:
    SynthKind = Literal[KINDS]
    SynthDifficulty = Literal[tuple(DIFFICULTIES)]

out = CliConsole()
err = CliConsole(stderr=True)


@handle_errors()
def validate(
    cohort: Annotated[Path, typer.Option("--cohort", help="Cohort CSV: case_id, slide_id, label column.")],
    features: Annotated[Path, typer.Option("--features", help="Folder of per-slide .h5 feature files ({slide_id}.h5).")],
    label_col: Annotated[str, typer.Option("--label-col", help="Name of the label column in the cohort CSV.")],
    positive: Annotated[str, typer.Option("--positive", help="Label value that counts as positive (case-insensitive).")],
    omics: Annotated[Optional[Path], typer.Option("--omics", help="Omics: folder of per-case .npy or a CSV/TSV matrix with case_id.")] = None,
    folds: Annotated[int, typer.Option(help="Planned cross-validation folds (checks each class has enough cases).", min=2)] = 5,
    no_omics: Annotated[bool, typer.Option("--no-omics", help="Histology only: do not load or require omics.")] = False,
    no_log2: Annotated[bool, typer.Option("--no-log2", help="Omics are already log-transformed (as for momkd train).")] = False,
    omics_raw: Annotated[bool, typer.Option("--omics-raw", help="Omics are fed as stored (as for momkd train --omics-raw).")] = False,
) -> None:
    """Check a cohort and list every problem, one line each (exit 2 if there is any). Omics get the checks
    ``momkd train`` applies with the same --no-log2/--omics-raw; warnings (e.g. constant genes) refuse nothing."""
    from rich.progress import Progress

    from momkd.data.omics import OmicsTransform
    from momkd.data.validate import validate_cohort

    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("reading slides", total=None)
        report = validate_cohort(cohort, features, None if no_omics else omics, label_col, positive, folds=folds,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total),
                                 omics_transform=OmicsTransform(log2=not (no_log2 or omics_raw), raw=omics_raw))
    for warning in report.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        for problem in report.problems:
            out.print(str(problem), markup=False, highlight=False, soft_wrap=True)
        err.print(f"[red]{len(report.problems)} problem(s)[/red] in {escape(str(cohort))}", highlight=False, soft_wrap=True)
        raise typer.Exit(USAGE_ERROR)

    s = report.summary
    out.print(f"{cohort}: ok", markup=False, highlight=False, soft_wrap=True)
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("cases", str(s["cases"]))
    table.add_row("slides", str(s["slides"]))
    table.add_row("classes", ", ".join(f"{name}: {n}" for name, n in s["classes"].items()))
    table.add_row("patches per slide", f"min {s['patches']['min']}, median {s['patches']['median']:g}, max {s['patches']['max']}")
    table.add_row("feature dim", str(s["feature_dim"]) + (f" ({s['encoder']})" if s["encoder"] else ""))
    table.add_row("omics genes", "not checked" if s["genes"] is None else str(s["genes"]))
    if s["unlisted_files"]:
        table.add_row("unlisted .h5 files", f"{s['unlisted_files']} (not in the cohort table, ignored)")
    out.print(table)


@handle_errors(interrupted="{out_dir} is incomplete; rerun the same command to write it again")
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write cohort.csv, features/ and omics.csv into.")],
    cases: Annotated[int, typer.Option(help="Number of cases (about 40 % positive).", min=10)] = 60,
    feature_dim: Annotated[int, typer.Option(help="Patch feature dimension.", min=2)] = 64,
    genes: Annotated[int, typer.Option(help="Number of omics genes.", min=8)] = 200,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed writes the same files).")] = 0,
    kind: Annotated[SynthKind, typer.Option(help="default: the demo cohort; study: labels from a molecular state, "
                                                 "a small clustered signal, stain shift, label noise.")] = "default",
    difficulty: Annotated[SynthDifficulty, typer.Option(help="Signal strength, signal fraction and label noise of "
                                                             "a --kind study cohort.")] = "medium",
    patches: Annotated[Optional[tuple[int, int]], typer.Option(help="Patches per slide, range LO HI (default 150 600).",
                                                               min=1)] = None,
    slides: Annotated[Optional[tuple[int, int]], typer.Option(help="Slides per case, range LO HI (default 1 2).",
                                                              min=1)] = None,
) -> None:
    """Write a synthetic paired cohort in the real formats (TRIDENT .h5, omics CSV, cohort CSV)."""
    from momkd.synth import make_synthetic_cohort

    ranges: dict[str, Any] = {name: value for name, value in (("patches", patches), ("slides_per_case", slides)) if value is not None}
    if any(lo > hi for lo, hi in ranges.values()):
        raise MomkdError("--patches and --slides take a range LO HI with LO <= HI")
    try:
        made = make_synthetic_cohort(out_dir, cases=cases, feature_dim=feature_dim, genes=genes, seed=seed, kind=kind,
                                     difficulty=difficulty, **ranges)
    except OSError as e:
        raise MomkdError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    data = " ".join(shlex.quote(str(x)) for x in (
        "--cohort", made.cohort_csv, "--features", made.features_dir, "--omics", made.omics_path,
        "--label-col", made.label_col, "--positive", made.positive))
    out.print(f"cohort table:   {made.cohort_csv}\nslide features: {made.features_dir}\nomics:          {made.omics_path}",
              markup=False, highlight=False, soft_wrap=True)
    if made.truth_csv is not None:
        out.print(f"ground truth:   {made.truth_csv}, {made.signal_masks}, {made.patch_tissue}", markup=False,
                  highlight=False, soft_wrap=True)
    out.print("next:", highlight=False)
    out.print(f"  momkd validate {data}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"  momkd train {data} --out {shlex.quote(str(Path(out_dir) / 'run'))}", markup=False, highlight=False,
              soft_wrap=True)
