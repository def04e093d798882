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
    for command in ("validate", "synth", "train", "evaluate", "demo"):
        assert command in result.stdout


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from momkd.cli.main import app\n"
        "try:\n    app(['--help'], prog_name='momkd')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'torch_geometric', 'onnx', 'onnxruntime', 'h5py', 'scipy', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    heavy_line = [line for line in result.stdout.splitlines() if line.startswith("HEAVY:")]
    assert heavy_line == ["HEAVY:"], result.stdout
