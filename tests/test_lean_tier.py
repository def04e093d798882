"""The base tier never imports PyTorch: `import momkd`, the CLI and `momkd --help` work with torch blocked."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_import_momkd_without_torch() -> None:
    result = run_blocked("import momkd, momkd.errors, momkd.cli.main; print(momkd.__version__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __import__("momkd").__version__


def test_help_without_torch_lists_commands() -> None:
    result = run_blocked("from momkd.cli.main import app; app(['--help'], prog_name='momkd')")
    assert result.returncode == 0, result.stderr
    for command in ("validate", "synth", "train", "evaluate", "demo", "infer", "export", "report"):
        assert command in result.stdout


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from momkd.cli.main import app\n"
        "try:\n    app(['--help'], prog_name='momkd')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'torch_geometric', 'onnx', 'onnxruntime', 'h5py', 'scipy', 'sklearn')"
        " if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    heavy_line = [line for line in result.stdout.splitlines() if line.startswith("HEAVY:")]
    assert heavy_line == ["HEAVY:"], result.stdout


def test_infer_heatmaps_are_torch_free_and_matplotlib_only_when_asked(tmp_path) -> None:
    """`momkd infer` never imports matplotlib unless --heatmaps is given; --heatmaps works with torch blocked, and
    without matplotlib it is a one-line usage error before anything is written."""
    from momkd.testing.toy import build_toy_model_dir, write_slide_folder

    build_toy_model_dir(tmp_path / "model", feature_dim=8)
    write_slide_folder(tmp_path / "in", [9, 14], 8)
    infer = ("from momkd.cli.main import app\n"
             "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
             "print('LOADED:' + ','.join(m for m in ('torch', 'matplotlib') if sys.modules.get(m) is not None))\n"
             "sys.exit(code)\n")

    def run(block: str, *extra: str) -> subprocess.CompletedProcess:
        args = ["infer", str(tmp_path / "model"), str(tmp_path / "in"), "--quiet", *extra]
        return subprocess.run([sys.executable, "-c", f"import sys; {block}\n{infer}", *args],
                              capture_output=True, text=True, timeout=120)

    plain = run("sys.modules['torch'] = None", "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[-1] == "LOADED:"
    painted = run("sys.modules['torch'] = None", "--out", str(tmp_path / "painted"), "--heatmaps")
    assert painted.returncode == 0, painted.stderr
    assert painted.stdout.splitlines()[-1] == "LOADED:matplotlib"
    assert sorted(p.name for p in (tmp_path / "painted" / "heatmaps").glob("*.png")) == ["slide_000.png",
                                                                                        "slide_001.png"]
    refused = run("sys.modules['torch'] = None; sys.modules['matplotlib'] = None", "--out", str(tmp_path / "no_mpl"),
                  "--heatmaps")
    assert refused.returncode == 2
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --heatmaps needs matplotlib"), refused.stderr
    assert not (tmp_path / "no_mpl").exists()
