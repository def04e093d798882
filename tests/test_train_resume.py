"""Training survives interruption: per-epoch state, ``momkd train --resume``, kill -9 of ``train`` and ``export``.

What "equal" means here: every file of the resumed run folder (config.json, splits/, summary.json, summary.md and
each fold's model.safetensors, model.json, omics_transform.json, history.csv, metrics.json,
test_predictions.csv) is byte-for-byte the file the uninterrupted run (same arguments, same seed, same process
settings) wrote, and the resumed folder holds no other file (no resume state, no temporary). For ``export``:
model.onnx and model.pt are byte-identical and manifest.json differs only in its ``created`` time stamp.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from momkd.cli.main import app  # noqa: E402
from momkd.errors import RunFolderError  # noqa: E402
from momkd.synth import make_synthetic_cohort  # noqa: E402
from momkd.train.resume import EpochState, RandomState, load_epoch_state, save_epoch_state  # noqa: E402
from momkd.train.runfolder import CONFIG, METRICS, RESUME, SUMMARY  # noqa: E402

runner = CliRunner()
SMALL = ("--folds", "2", "--epochs", "3", "--memory-size", "4")
CLI = [sys.executable, "-c", "from momkd.cli.main import app; app()"]


def text(result) -> str:  # noqa: ANN001
    """The command's output with line wrapping undone."""
    return " ".join(result.output.split())


def train_args(cohort, out: Path, *extra: str) -> list[str]:  # noqa: ANN001
    return ["train", "--cohort", str(cohort.cohort_csv), "--features", str(cohort.features_dir),
            "--omics", str(cohort.omics_path), "--label-col", cohort.label_col, "--positive", cohort.positive,
            "--out", str(out), "--device", "cpu", *SMALL, *extra]


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):  # noqa: ANN201
    """16 cases, D = 16, 40 genes, small slides: two folds of MoMKD train in seconds."""
    return make_synthetic_cohort(tmp_path_factory.mktemp("tiny_cohort"), cases=16, feature_dim=16, genes=40,
                                 patches=(40, 80))


@pytest.fixture(scope="module")
def reference(tiny_cohort, tmp_path_factory) -> Path:  # noqa: ANN001
    """The uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = runner.invoke(app, train_args(tiny_cohort, out))
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- the per-epoch state
def test_epoch_state_round_trips_every_generator_and_the_optimizer(tmp_path: Path) -> None:
    from momkd.train.stopping import PaperStopping

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step(0.5)
    stopping = PaperStopping(patience=3, min_epochs=1)
    stopping.update(1, math.nan, 0.7)                       # an undefined AUC: the best key holds -inf
    rng = np.random.default_rng([7, 1])
    rng.random(5)
    random.seed(3)
    state = EpochState(epoch=4, stopped=False, model=model.state_dict(), optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), stopping=stopping.state_dict(),
                       best_state={k: v.clone() for k, v in model.state_dict().items()}, best_epoch=3,
                       history=[{"epoch": 1, "lr": 0.01, "val_auc": math.nan}],
                       random=RandomState.capture(rng, torch.device("cpu")))
    save_epoch_state(tmp_path / RESUME, state)
    expected = (rng.random(3), torch.rand(3), random.random())

    loaded = load_epoch_state(tmp_path / RESUME)
    assert loaded is not None and (loaded.epoch, loaded.best_epoch, loaded.stopped) == (4, 3, False)
    assert math.isnan(loaded.history[0]["val_auc"]) and loaded.history[0]["epoch"] == 1
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model[name], value) and torch.equal(loaded.best_state[name], value)
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    other.load_state_dict(loaded.optimizer)
    for a, b in zip(other.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    restored = PaperStopping(patience=3, min_epochs=1)
    restored.load_state_dict(loaded.stopping)
    assert restored.best == stopping.best and restored.stale == stopping.stale
    assert loaded.scheduler == scheduler.state_dict()
    fresh = np.random.default_rng(0)
    loaded.random.restore(fresh, torch.device("cpu"))
    got = (fresh.random(3), torch.rand(3), random.random())
    assert np.array_equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2] == expected[2]
    assert load_epoch_state(tmp_path / "absent.safetensors") is None
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(RunFolderError, match="broken.safetensors: unreadable training state"):
        load_epoch_state(tmp_path / "broken.safetensors")


# --------------------------------------------------------------------------- --resume (in process)
@pytest.mark.parametrize(("fold", "epoch"), [(0, 1), (1, 2), (1, 3)])   # (1, 3): after the last epoch
def test_resume_after_a_stop_at_an_epoch_boundary_equals_the_uninterrupted_run(
        tiny_cohort, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fold: int, epoch: int) -> None:
    import momkd.train.run as run_module

    save = run_module.save_epoch_state

    def save_then_interrupt(path: Path, state: EpochState) -> None:
        save(path, state)
        if path.parent.name == f"fold_{fold}" and state.epoch == epoch:
            raise KeyboardInterrupt                         # Ctrl-C right after the epoch's state was saved

    out = tmp_path / "run"
    monkeypatch.setattr(run_module, "save_epoch_state", save_then_interrupt)
    stopped = runner.invoke(app, train_args(tiny_cohort, out))
    monkeypatch.undo()
    assert stopped.exit_code == 130 and "--resume" in text(stopped)
    assert not (out / SUMMARY).exists() and (out / f"fold_{fold}" / RESUME).is_file()
    assert (out / "fold_0" / METRICS).is_file() == (fold == 1)
    (out / f"fold_{fold}" / ".history.csv.k1ll3d.tmp").write_text("half")   # what a kill mid-write leaves

    again = runner.invoke(app, train_args(tiny_cohort, out))
    assert again.exit_code == 2 and "--resume" in text(again)              # a fresh run still refuses it
    resumed = runner.invoke(app, [*train_args(tiny_cohort, out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"fold {fold}: resuming after epoch {epoch}" in text(resumed)
    assert ("fold 0: finished earlier" in text(resumed)) == (fold == 1)
    assert folder_files(out) == folder_files(reference)


def test_resume_refuses_other_arguments_and_names_them(tiny_cohort, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / SUMMARY).unlink()
    (out / "fold_1" / METRICS).unlink()                    # an unfinished run
    result = runner.invoke(app, [*train_args(tiny_cohort, out), "--resume", "--epochs", "4", "--lr", "0.001"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot resume" in text(result) and "train.epochs: 3 -> 4" in text(result)
    assert "train.lr: 0.0002 -> 0.001" in text(result)
    config = json.loads((out / CONFIG).read_text())
    config["fingerprint"]["cohort"] = "0" * 64              # the cohort changed since the run started
    (out / CONFIG).write_text(json.dumps(config))
    result = runner.invoke(app, [*train_args(tiny_cohort, out), "--resume"])
    assert result.exit_code == 2 and "fingerprint.cohort" in text(result)
    result = runner.invoke(app, [*train_args(tiny_cohort, out), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "pass only one" in text(result)


def test_resume_of_a_finished_run_changes_nothing(tiny_cohort, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = runner.invoke(app, [*train_args(tiny_cohort, out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "finished earlier; nothing left to train" in text(result)
    assert folder_files(out) == folder_files(reference)


def test_resume_needs_a_run_folder(tmp_path: Path) -> None:
    from momkd.train.run import _resumable

    assert not _resumable(tmp_path / "new")                # nothing there yet: --resume trains from the start
    (tmp_path / "empty").mkdir()
    assert not _resumable(tmp_path / "empty")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="nothing to resume"):
        _resumable(tmp_path / "photos")


# --------------------------------------------------------------------------- undefined AUC (issue 15)
def test_an_undefined_auc_is_printed_as_such() -> None:
    from momkd.metrics import UNDEFINED_AUC, auc_text
    from momkd.tables import UNDEFINED, cv_table

    assert auc_text(math.nan) == UNDEFINED_AUC == "undefined (one class)"
    assert auc_text(0.0) == "0.000" and auc_text(0.75, 0.1) == "0.750 ± 0.100"
    assert auc_text(math.nan, math.nan) == UNDEFINED_AUC
    metrics = {"auc": math.nan, "acc": 0.5, "f1": 0.0, "f1_macro": 0.3}
    summary = {"folds": [{"fold": 0, "threshold": 0.5, "test": metrics}], "mean": metrics,
               "std": dict.fromkeys(metrics, math.nan)}
    table = cv_table(summary)
    assert table.rows[0][2] == UNDEFINED and table.rows[0][3] == "50.0"   # case AUC, then case ACC
    assert table.footer is not None and table.footer[2] == UNDEFINED and table.footer[3] == "50.0 ± n/a"
    assert table.rows[0][6] == "n/a"                       # per-slide AUC: absent from this summary


# --------------------------------------------------------------------------- kill -9 (subprocesses)
def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)


def _kill_at_random(args: list[str], env: dict[str, str], started: Path, window: float, seed: int) -> None:
    """Start the command, wait until ``started`` exists, then SIGKILL it after a seeded delay in [0, window]."""
    delay = random.Random(seed).uniform(0.0, window)
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not started.exists() and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference_subprocess(tiny_cohort, tmp_path_factory, subprocess_env) -> tuple[Path, float]:  # noqa: ANN001
    """The uninterrupted run in a subprocess (the killed ones run in the same settings) and its training time."""
    out = tmp_path_factory.mktemp("reference_subprocess") / "run"
    proc = subprocess.Popen([*CLI, *train_args(tiny_cohort, out)], env=subprocess_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while not (out / CONFIG).exists() and proc.poll() is None:
        time.sleep(0.02)
    start = time.perf_counter()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_killed_at_a_random_moment_then_resumed_reproduces_the_run(
        tiny_cohort, reference_subprocess, subprocess_env, tmp_path: Path, seed: int) -> None:  # noqa: ANN001
    reference_run, seconds = reference_subprocess
    out = tmp_path / "run"
    _kill_at_random(train_args(tiny_cohort, out), subprocess_env, out / CONFIG, seconds, seed)
    resumed = _run([*train_args(tiny_cohort, out), "--resume"], subprocess_env)
    assert resumed.returncode == 0, resumed.stderr
    assert folder_files(out) == folder_files(reference_run)


@pytest.mark.slow
def test_export_killed_at_a_random_moment_then_rerun_reproduces_the_model_folder(
        reference: Path, subprocess_env, tmp_path: Path) -> None:  # noqa: ANN001
    from momkd.manifest import load_manifest

    def model_folder(folder: Path) -> dict[str, bytes]:
        files = folder_files(folder)
        manifest = json.loads(files.pop("manifest.json"))
        files.pop("manifest.json.sha256", None)           # the digest of a manifest with its own time stamp
        manifest.pop("created")
        return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}

    expected_dir = tmp_path / "expected"
    start = time.perf_counter()
    done = _run(["export", str(reference), "--out", str(expected_dir)], subprocess_env)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    expected = model_folder(expected_dir)
    for seed in (0, 1):
        out = tmp_path / f"model_{seed}"
        _kill_at_random(["export", str(reference), "--out", str(out)], subprocess_env, reference, seconds, seed)
        command = ["export", str(reference), "--out", str(out)]
        if out.exists():                                   # the kill came after the folder was moved into place:
            load_manifest(out, verify_checksums=True)      # it is whole, and a plain rerun says what to do
            refused = _run(command, subprocess_env)
            assert refused.returncode == 2 and "--overwrite" in refused.stderr, refused.stderr
            command.append("--overwrite")
        rerun = _run(command, subprocess_env)              # never a half-written --out: a plain rerun works
        assert rerun.returncode == 0, rerun.stderr
        assert model_folder(out) == expected
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
