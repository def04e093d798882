"""`momkd report`: on small trained MoMKD and ABMIL runs, every figure exists and is non-blank, the table numbers
are summary.json's, the memory-code patches are the checkpoint's own similarities, ABMIL skips the memory
sections, and bad run folders are one-line errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib")
torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from momkd.cli.main import app  # noqa: E402
from momkd.data.cohort import case_level  # noqa: E402
from momkd.metrics import roc_auc  # noqa: E402
from momkd.train.runfolder import load_run  # noqa: E402
from momkd.tables import summary_markdown  # noqa: E402

runner = CliRunner()
N_CODES, TOP_K, FOLDS = 2, 2, 2
# the Markdown columns after fold and threshold: (fold-record block, mean block, std block, metric)
CASE, SLIDE = ("test", "mean", "std"), ("test_slide", "mean_slide", "std_slide")
COLUMNS = [(*CASE, "auc"), (*CASE, "acc"), (*CASE, "f1"), (*CASE, "f1_macro"),
           (*SLIDE, "auc"), (*SLIDE, "acc"), (*SLIDE, "f1_macro")]
HEADER = ["case AUC (%)", "case ACC (%)", "case F1 (%)", "case macro F1 (%)", "slide AUC (%)", "slide ACC (%)",
          "slide macro F1 (%)"]
METRICS = ("auc", "acc", "f1", "f1_macro")


def pixel_variance(path: Path) -> float:
    from matplotlib.image import imread

    return float(np.asarray(imread(path), dtype=np.float64)[..., :3].var())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A MoMKD run (2 folds, 2 epochs, 2 codes per bank) and an ABMIL run on the same splits, tiny cohort."""
    from momkd.synth import make_synthetic_cohort

    root = tmp_path_factory.mktemp("report_runs")
    synth = make_synthetic_cohort(root / "data", cases=16, feature_dim=16, genes=40, patches=(20, 60))
    common = ["--cohort", str(synth.cohort_csv), "--features", str(synth.features_dir), "--label-col",
              synth.label_col, "--positive", synth.positive, "--device", "cpu", "--folds", str(FOLDS)]
    out = {"momkd": root / "momkd", "abmil": root / "abmil"}
    result = runner.invoke(app, ["train", *common, "--omics", str(synth.omics_path), "--out", str(out["momkd"]),
                                 "--epochs", "2", "--memory-size", str(N_CODES)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", *common, "--model", "abmil", "--out", str(out["abmil"]), "--epochs", "1",
                                 "--splits", str(out["momkd"] / "splits")])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def report(runs: dict[str, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "momkd"
    result = runner.invoke(app, ["report", str(runs["momkd"]), "--out", str(out), "--compare", str(runs["abmil"]),
                                 "--top-k", str(TOP_K), "--html", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def md_table(text: str, first_header: str, with_header: bool = False) -> list[list[str]]:
    """The rows (cells, without ** emphasis) of the Markdown table whose header starts with ``first_header``
    (the header row first if ``with_header``)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = [lines[start]] if with_header else []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(ln)
    return [[c.strip().strip("*") for c in ln.strip("|").split("|")] for ln in rows]


def strip_new_metrics(summary: dict) -> dict:
    """A summary.json as versions before per-slide and macro F1 metrics wrote it."""
    old = {k: v for k, v in summary.items() if k not in ("mean_slide", "std_slide")}
    old["folds"] = [{k: v for k, v in r.items() if not k.endswith("_slide")} for r in summary["folds"]]
    for record in old["folds"]:
        for split in ("val", "test"):
            record[split] = {k: v for k, v in record[split].items() if k != "f1_macro"}
    for part in ("mean", "std"):
        old[part] = {k: v for k, v in summary[part].items() if k != "f1_macro"}
    return old


def test_every_figure_exists_and_is_not_blank(report: Path) -> None:
    text = (report / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(linked) == {"figures/roc.png", "figures/loss.png", "figures/memory_dynamics.png"}
    for rel in linked:
        assert pixel_variance(report / rel) > 0, rel


def test_cv_table_numbers_are_summary_json(report: Path, runs: dict[str, Path]) -> None:
    summary = json.loads((runs["momkd"] / "summary.json").read_text())
    with (report / "cv_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["fold"] for r in rows] == [str(f["fold"]) for f in summary["folds"]] + ["mean", "std"]
    assert list(rows[0]) == ["fold", "threshold", *METRICS, *(f"slide_{k}" for k in METRICS)]
    for row, record in zip(rows, summary["folds"]):
        assert float(row["threshold"]) == record["threshold"]
        for key in METRICS:
            assert float(row[key]) == record["test"][key]
            assert float(row[f"slide_{key}"]) == record["test_slide"][key]
    for row, part in zip(rows[-2:], ("mean", "std")):
        assert [float(row[k]) for k in METRICS] == [summary[part][k] for k in METRICS]
        assert [float(row[f"slide_{k}"]) for k in METRICS] == [summary[f"{part}_slide"][k] for k in METRICS]

    text = (report / "report.md").read_text()
    md = md_table(text, "fold", with_header=True)
    assert md[0] == ["fold", "threshold", *HEADER]
    for cells, record in zip(md[1:], summary["folds"]):
        assert cells[2:] == [f"{100 * record[block][k]:.1f}" for block, _, _, k in COLUMNS]
    assert md[-1][2:] == [f"{100 * summary[m][k]:.1f} ± {100 * summary[s][k]:.1f}" for _, m, s, k in COLUMNS]
    assert "macro F1 is the definition of the authors' test.py and the paper's Table 1" in text
    summary_md = (runs["momkd"] / "summary.md").read_text()
    assert "the paper's Table 1" in summary_md and md_table(summary_md, "fold") == md[1:]


def test_compare_table_puts_the_runs_side_by_side(report: Path, runs: dict[str, Path]) -> None:
    rows = md_table((report / "report.md").read_text(), "run")
    assert [r[0] for r in rows] == ["momkd", "abmil"]
    for cells, name in zip(rows, ("momkd", "abmil")):
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert cells[1] == name
        assert cells[4:] == [f"{100 * summary[m][k]:.1f} ± {100 * summary[s][k]:.1f}" for _, m, s, k in COLUMNS]


def test_summary_of_an_older_version_renders_na(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "old"
    shutil.copytree(runs["abmil"], run)
    summary = strip_new_metrics(json.loads((run / "summary.json").read_text()))
    (run / "summary.json").write_text(json.dumps(summary))
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r"), "--compare", str(runs["momkd"])])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    old_rows = md_table(text, "fold") + md_table(text, "run")[:1]    # its folds, mean ± std and compare row
    for cells in old_rows:
        metric_cells = cells[-len(COLUMNS):]                             # case AUC, ACC, F1 | the new ones
        assert "n/a" not in metric_cells[:3] and metric_cells[3:] == ["n/a"] * (len(COLUMNS) - 3), cells
    assert "n/a" not in md_table(text, "run")[1]                         # the current run has every metric
    with (tmp_path / "r" / "cv_table.csv").open() as f:
        for row in csv.DictReader(f):
            assert row["f1_macro"] == row["slide_auc"] == "" and row["auc"] != ""
    assert md_table(summary_markdown(summary), "fold") == md_table(text, "fold")


def test_roc_data_reproduces_the_summary_auc(runs: dict[str, Path]) -> None:
    run = load_run(runs["momkd"])
    for fold, record in zip(run.folds, run.summary["folds"]):
        _, y, p = case_level(fold.test.items, fold.test.probabilities)
        assert roc_auc(y, p) == pytest.approx(record["test"]["auc"], abs=1e-12)


def test_memory_codes_are_the_checkpoints_similarities(report: Path, runs: dict[str, Path]) -> None:
    from momkd.data.slide import read_slide
    from momkd.graph import neighbor_table
    from momkd.train.checkpoint import load_checkpoint

    with (report / "memory_codes.csv").open() as f:
        hits = list(csv.DictReader(f))
    assert len(hits) == FOLDS * 2 * N_CODES * TOP_K
    for fold in range(FOLDS):
        for bank in ("positive", "negative"):
            for code in range(N_CODES):
                sims = [float(h["similarity"]) for h in hits
                        if (h["fold"], h["bank"], h["code"]) == (str(fold), bank, str(code))]
                assert len(sims) == TOP_K and sims == sorted(sims, reverse=True)
    test_slides = {r["slide_id"] for r in csv.DictReader((runs["momkd"] / "fold_1" / "test_predictions.csv").open())}
    hit = next(h for h in hits if (h["fold"], h["bank"], h["code"], h["rank"]) == ("1", "negative", "1", "1"))
    assert hit["slide_id"] in test_slides
    model, meta = load_checkpoint(runs["momkd"] / "fold_1")
    features = Path(json.loads((runs["momkd"] / "config.json").read_text())["data"]["features"])
    slide = read_slide(features / f"{hit['slide_id']}.h5")
    nb = neighbor_table(slide.coords, k=meta["model_config"]["k"], direction=meta["model_config"]["graph_direction"])
    with torch.no_grad():
        proj = model.forward_wsi(torch.from_numpy(slide.features), torch.from_numpy(nb),
                                 torch.tensor([0, len(slide.features)])).patch_proj
        codes_neg, _ = model.memory.normalized()
    row = int(np.flatnonzero((slide.coords == [int(hit["x"]), int(hit["y"])]).all(axis=1))[0])
    sims = (proj @ codes_neg.t())[:, 1]
    assert float(sims[row]) == pytest.approx(float(hit["similarity"]), abs=1e-5)
    assert float(sims.max()) <= float(hit["similarity"]) + 1e-5      # the best of its slide (and of all slides)


def test_html_is_one_self_contained_file(report: Path) -> None:
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "figures/" not in page and "<table>" in page


def test_abmil_report_has_no_memory_sections(runs: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(runs["abmil"]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "it has no class memory" in text and "Fig. 3" in text
    assert not (tmp_path / "r" / "memory_codes.csv").exists()
    assert sorted(p.name for p in (tmp_path / "r" / "figures").iterdir()) == ["loss.png", "roc.png"]


def test_missing_slide_features_leave_out_the_codes_only(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "moved"
    shutil.copytree(runs["momkd"], run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["features"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "are not available: no memory-code patches" in text
    assert (tmp_path / "r" / "figures" / "memory_dynamics.png").is_file()


@pytest.mark.parametrize("case", ["missing", "no_summary", "bad_json", "bad_history", "bad_compare"])
def test_bad_run_folders_are_one_line_errors(runs: dict[str, Path], tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["abmil"], run)
    extra: list[str] = []
    if case == "missing":
        shutil.rmtree(run)
        named = str(run)
    elif case == "no_summary":
        (run / "summary.json").unlink()
        named = str(run / "summary.json")
    elif case == "bad_json":
        (run / "summary.json").write_text("{not json")
        named = str(run / "summary.json")
    elif case == "bad_history":
        with (run / "fold_0" / "history.csv").open("a") as f:
            f.write("1,2\n")
        named = str(run / "fold_0" / "history.csv")
    else:
        extra = ["--compare", str(tmp_path / "nowhere")]
        named = str(tmp_path / "nowhere")
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r"), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and named in errors[0], result.stderr
