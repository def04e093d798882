"""``momkd demo`` end to end at a tiny size: every stage writes its outputs and infer agrees with evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from momkd.cli.main import app

pytest.importorskip("torch")
pytest.importorskip("onnx")


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--cases", "24", "--folds", "2", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    for model in ("momkd", "abmil"):
        summary = json.loads((out / model / "summary.json").read_text())
        assert len(summary["folds"]) == 2
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["model"]["folds"] == [0, 1]
    with open(out / "external_momkd" / "predictions.csv", newline="") as f:
        evaluated = {r["slide_id"]: float(r["probability"]) for r in csv.DictReader(f)}
    with open(out / "infer" / "predictions.csv", newline="") as f:
        inferred = {r["slide_id"]: float(r["probability"]) for r in csv.DictReader(f) if r["status"] == "ok"}
    assert inferred.keys() == evaluated.keys()
    assert max(abs(inferred[s] - evaluated[s]) for s in evaluated) <= 1e-5
