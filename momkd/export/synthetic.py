"""A model folder with random weights, for latency benchmarks and tests that need a real exported MoMKD graph
but no trained model.

``random_run`` writes a finished-looking run folder (``config.json``, ``summary.json``, ``fold_K`` checkpoints of
randomly initialised models; no cohort data), and ``export_random_model`` freezes it with ``export_run``, so the
folder is exported and verified exactly like a trained one (on synthetic slides, since there is no data). The
predictions mean nothing; the graph, its dimensions and its cost are those of the chosen preset.

Command line (used by ``benchmarks/gpu_session.sh``)::

    python -m momkd.export.synthetic OUT_DIR [--preset paper|official] [--in-dim 1536] [--folds 1] [--fp16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from momkd.errors import MomkdError


def random_run(run_dir: str | Path, preset_name: str = "paper", in_dim: int = 1536, folds: int = 1, seed: int = 0,
               dims: dict[str, Any] | None = None) -> Path:
    """Write a run folder of ``folds`` randomly initialised fold models (``ModelConfig`` preset ``preset_name``
    with ``dims`` overriding fields, e.g. ``{"dim": 8}``); returns its path. No cohort data is referenced, and no
    encoder is named (``momkd infer`` then accepts any slide's ``encoder`` attribute)."""
    import torch

    import momkd
    from momkd.config import preset
    from momkd.models import build_model
    from momkd.train.checkpoint import save_checkpoint
    from momkd.train.runfolder import CONFIG, SUMMARY, fold_dir, write_json

    if folds < 1:
        raise MomkdError(f"folds must be >= 1 (got {folds})")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg = preset(preset_name)[0].replace(**(dims or {}))
    records = []
    for k in range(folds):
        torch.manual_seed(seed * 1000 + k)
        model = build_model(cfg, in_dim, 0)
        record = {"fold": k, "threshold": 0.5, "val": {}, "test": {}}
        records.append(record)
        save_checkpoint(fold_dir(run, k), model.state_dict(), {
            "momkd_version": momkd.__version__, "fold": k, "preset": preset_name, "model_config": cfg.to_dict(),
            "in_dim": in_dim, "omics_dim": 0, "class_names": ["negative", "positive"], "encoder": None,
            "threshold": 0.5})
    write_json(run / CONFIG, {
        "momkd_version": momkd.__version__, "preset": preset_name, "class_names": ["negative", "positive"],
        "feature_dim": in_dim, "encoder": None, "model": cfg.to_dict(),
        "note": "random weights (momkd.export.synthetic): for benchmarks only"})
    write_json(run / SUMMARY, {"model": cfg.model, "preset": preset_name, "folds": records, "mean": {}, "std": {}})
    return run


def export_random_model(out_dir: str | Path, preset_name: str = "paper", in_dim: int = 1536, folds: int = 1,
                        seed: int = 0, fp16: bool = False, dims: dict[str, Any] | None = None,
                        overwrite: bool = True) -> dict[str, Any]:
    """``random_run`` + ``export_run`` into ``out_dir`` (ONNX, TorchScript twin, manifest); returns the manifest."""
    from momkd.export.folder import export_run

    with tempfile.TemporaryDirectory(prefix="momkd-random-run-") as tmp:
        run = random_run(Path(tmp) / "run", preset_name, in_dim, folds, seed, dims)
        return export_run(run, out_dir, fp16=fp16, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m momkd.export.synthetic",
                                     description="Export a random-weight MoMKD model folder (for benchmarks).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="paper", choices=("paper", "official"))
    parser.add_argument("--in-dim", type=int, default=1536)
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp16", action="store_true", help="fp16 matmuls in model.onnx (I/O stays fp32)")
    args = parser.parse_args(argv)
    try:
        manifest = export_random_model(args.out_dir, args.preset, args.in_dim, args.folds, args.seed, args.fp16)
    except MomkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} ({manifest['model']['preset']} preset, D_in {manifest['model']['feature_dim']}, "
          f"{len(manifest['model']['folds'])} fold(s), onnx {manifest['onnx']['precision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
