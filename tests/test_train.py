"""End-to-end training through the CLI on the synthetic cohort: run folder, reproducibility, refusal of bad data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from momkd.cli.main import app  # noqa: E402

runner = CliRunner()
METRICS = {"auc", "acc", "f1", "f1_macro"}

HISTORY_COLUMNS = {
    "epoch", "lr", "loss_total", "loss_ce", "loss_mse", "loss_align_wsi", "loss_align_omics", "loss_mem",
    "train_auc", "val_auc", "pos_active", "pos_perplexity", "neg_active", "neg_perplexity",
}


def train_args(synth, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--cohort", str(synth.cohort_csv), "--features", str(synth.features_dir),
        "--omics", str(synth.omics_path), "--label-col", synth.label_col, "--positive", synth.positive,
        "--out", str(out), "--device", "cpu", *extra,
    ]


@pytest.fixture(scope="module")
def small_run(synth_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "momkd"
    result = runner.invoke(app, train_args(synth_cohort, out, "--folds", "3", "--epochs", "3", "--memory-size", "4"))
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())                      # rich wraps long lines
    assert "test per case: AUC" in printed and "per slide (paper Table 1): AUC" in printed, printed
    assert printed.count("macro-F1") == 2, printed
    return out


def test_run_folder_layout(small_run: Path) -> None:
    for name in ("config.json", "summary.json", "summary.md", "splits/fold_0.csv"):
        assert (small_run / name).is_file(), name
    for k in range(3):
        fold = small_run / f"fold_{k}"
        for name in ("model.safetensors", "model.json", "omics_transform.json", "history.csv", "metrics.json",
                     "test_predictions.csv"):
            assert (fold / name).is_file(), f"fold_{k}/{name}"


def test_summary_schema(small_run: Path) -> None:
    summary = json.loads((small_run / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    for fold in summary["folds"]:
        assert 0.0 <= fold["threshold"] <= 1.0
        for split in ("val", "test", "val_slide", "test_slide"):
            assert set(fold[split]) == {*METRICS, "threshold", "n", "n_pos"}
            assert fold[split]["threshold"] == fold["threshold"]
        assert json.loads((small_run / f"fold_{fold['fold']}" / "metrics.json").read_text()) == fold
    for block, mean, std in (("test", "mean", "std"), ("test_slide", "mean_slide", "std_slide")):
        for key in METRICS:
            values = [f[block][key] for f in summary["folds"]]
            assert summary[mean][key] == pytest.approx(float(np.mean(values)))
            assert summary[std][key] == pytest.approx(float(np.std(values, ddof=1)))
    assert "mean ± std" in (small_run / "summary.md").read_text()


def test_summary_metrics_recompute_from_test_predictions(small_run: Path) -> None:
    """Per case (mean slide probability per case) and per slide metrics are those of test_predictions.csv's rows
    at the fold's threshold; the F1 pair matches sklearn's positive-class and macro F1."""
    skm = pytest.importorskip("sklearn.metrics")
    summary = json.loads((small_run / "summary.json").read_text())
    for fold in summary["folds"]:
        with (small_run / f"fold_{fold['fold']}" / "test_predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        slide_y = np.array([int(r["label"]) for r in rows])
        slide_p = np.array([float(r["probability"]) for r in rows])
        cases = sorted({r["case_id"] for r in rows})
        case_y = np.array([next(int(r["label"]) for r in rows if r["case_id"] == c) for c in cases])
        case_p = np.array([np.mean([float(r["probability"]) for r in rows if r["case_id"] == c]) for c in cases])
        for block, y, p in (("test", case_y, case_p), ("test_slide", slide_y, slide_p)):
            got, pred = fold[block], (p >= fold["threshold"]).astype(int)
            assert (got["n"], got["n_pos"]) == (len(y), int(y.sum()))
            assert got["acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
            assert got["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-6)
            assert got["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), abs=1e-6)
            assert got["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)


def test_history_has_every_term(small_run: Path) -> None:
    with (small_run / "fold_0" / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert 1 <= len(rows) <= 3
    assert HISTORY_COLUMNS <= set(rows[0])
    for row in rows:
        assert 0.0 <= float(row["pos_active"]) <= 1.0
        assert 1.0 <= float(row["pos_perplexity"]) <= 4.0 + 1e-6  # 4 codes per bank


def test_checkpoint_is_plain_tensors(small_run: Path) -> None:
    from safetensors.torch import load_file

    from momkd.train.checkpoint import load_checkpoint

    state = load_file(str(small_run / "fold_0" / "model.safetensors"))
    assert state and all(v.dtype.is_floating_point or not v.is_floating_point() for v in state.values())
    model, meta = load_checkpoint(small_run / "fold_0")
    assert meta["in_dim"] > 0 and meta["class_names"] == ["Negative", "Positive"]
    assert not model.training


def test_same_seed_same_run(synth_cohort, tmp_path: Path) -> None:
    args = ("--folds", "3", "--epochs", "1", "--memory-size", "4")
    first, second = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(app, train_args(synth_cohort, first, *args)).exit_code == 0
    assert runner.invoke(app, train_args(synth_cohort, second, *args)).exit_code == 0
    assert json.loads((first / "summary.json").read_text()) == json.loads((second / "summary.json").read_text())


def test_reuses_splits(synth_cohort, small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "abmil"
    result = runner.invoke(app, train_args(synth_cohort, out, "--model", "abmil", "--folds", "3", "--epochs", "1",
                                           "--splits", str(small_run / "splits")))
    assert result.exit_code == 0, result.output
    for k in range(3):
        assert (out / "splits" / f"fold_{k}.csv").read_text() == (small_run / "splits" / f"fold_{k}.csv").read_text()


def test_official_preset_trains(synth_cohort, tmp_path: Path) -> None:
    result = runner.invoke(app, train_args(synth_cohort, tmp_path / "official", "--preset", "official",
                                           "--folds", "3", "--epochs", "1"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["preset"] == "official" and config["model"]["graph_direction"] == "official"


def test_ema_memory_trains(synth_cohort, tmp_path: Path) -> None:
    result = runner.invoke(app, train_args(synth_cohort, tmp_path / "ema", "--memory-update", "ema", "--folds", "3",
                                           "--epochs", "1", "--alpha-omics", "0", "--no-recon"))
    assert result.exit_code == 0, result.output


def test_refuses_bad_data_and_lists_every_problem(synth_cohort, tmp_path: Path) -> None:
    features = tmp_path / "features"
    shutil.copytree(synth_cohort.features_dir, features)
    files = sorted(features.glob("*.h5"))
    files[0].write_bytes(b"")  # zero-byte file
    files[1].unlink()  # missing file
    result = runner.invoke(app, [
        "train", "--cohort", str(synth_cohort.cohort_csv), "--features", str(features), "--omics",
        str(synth_cohort.omics_path), "--label-col", synth_cohort.label_col, "--positive", synth_cohort.positive,
        "--out", str(tmp_path / "run"), "--device", "cpu",
    ])
    assert result.exit_code == 2
    assert files[0].stem in result.output and files[1].stem in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_evaluate_matches_fold_mean(synth_cohort, small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = runner.invoke(app, [
        "evaluate", str(small_run), "--cohort", str(synth_cohort.cohort_csv), "--features",
        str(synth_cohort.features_dir), "--label-col", synth_cohort.label_col, "--positive", synth_cohort.positive,
        "--out", str(out), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        folds = [float(row[f"probability_fold_{k}"]) for k in range(3)]
        assert float(row["probability"]) == pytest.approx(np.mean(folds), abs=1e-8)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3
    for record in (*metrics["folds"], metrics["mean_model"]):
        assert set(record) - {"fold"} == {*METRICS, "threshold", "n", "n_pos", "slide"}
        assert set(record["slide"]) == {*METRICS, "threshold", "n", "n_pos"}
        assert record["slide"]["n"] == len(rows) and record["slide"]["threshold"] == record["threshold"]
    printed = " ".join(result.output.split())                      # rich wraps long lines
    assert "per case: AUC" in printed and "per slide (paper Table 1): AUC" in printed and "macro-F1" in printed


@pytest.mark.slow
def test_momkd_learns_and_beats_chance(synth_cohort, tmp_path: Path) -> None:
    out = tmp_path / "full"
    result = runner.invoke(app, train_args(synth_cohort, out, "--epochs", "10"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean"]["auc"] > 0.7
