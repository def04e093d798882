"""The inference module that gets frozen: the trained fold models, called through their own ``forward_wsi``.

There is no second, hand-written copy of the network here. ``FrozenEnsemble`` holds the fold models exactly as
``load_checkpoint`` rebuilds them and averages what they return, so the exported graph is, by construction, the
model ``momkd evaluate`` scores (its ``probability`` column is the mean over folds of softmax(logits)[:, 1]).

Contract (the one ``momkd.runtime`` runs)::

    inputs   features (N, D) float32, neighbors (N, W) int64 (global rows of the packed batch, -1 pad),
             slide_offsets (B+1,) int64
    outputs  probability (B,)   mean over folds of softmax(logits)[:, 1]
             logits (B, 2)      mean over folds of the logits
             attention (N,)     mean over folds of the per-slide softmax (still sums to 1 within each slide)
             patch_score (N,)   mean over folds of the eq. 6 score (ABMIL: the attention logit)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from momkd.errors import RunFolderError

if TYPE_CHECKING:
    from momkd.models.abmil import ABMIL
    from momkd.models.momkd import MoMKD



class FrozenEnsemble(nn.Module):
    """The mean of one or more fold models, histology only, packed slides. Always in eval mode."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("FrozenEnsemble needs at least one model")
        self.models = nn.ModuleList(models)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenEnsemble":  # noqa: D401 - frozen: dropout never comes back
        return super().train(False)

    def forward(self, features: Tensor, neighbors: Tensor, slide_offsets: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        probability = logits = attention = patch_score = None
        for model in self.models:
            out = cast("MoMKD | ABMIL", model).forward_wsi(features, neighbors, slide_offsets)
            p = torch.softmax(out.logits, dim=-1)[:, 1]
            probability = p if probability is None else probability + p
            logits = out.logits if logits is None else logits + out.logits
            attention = out.attention if attention is None else attention + out.attention
            patch_score = out.patch_score if patch_score is None else patch_score + out.patch_score
        if probability is None or logits is None or attention is None or patch_score is None:
            raise ValueError("FrozenEnsemble needs at least one model")   # as __init__ checks
        n = float(len(self.models))
        if n == 1.0:
            return probability, logits, attention, patch_score
        return probability / n, logits / n, attention / n, patch_score / n


# --------------------------------------------------------------------------- mixed precision (fp16)
class Fp16Linear(TorchFunctionMode):
    """Every ``F.linear`` (``nn.Linear`` layers and the fused GATv2 projection alike) computes in float16 with
    float32 in and out; normalisation, attention softmax and the per-slide pooling stay in float32 (what
    ``torch.autocast`` does for linear layers, without putting the (B, N) pooling weights, ~1/N each, into fp16
    where they would be subnormal for large slides). Traced by the exporter as Cast -> Gemm/MatMul(fp16) -> Cast,
    with the weights folded into fp16 initializers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == torch.float32:
                half_bias = None if bias is None else bias.to(torch.float16)
                return F.linear(x.to(torch.float16), weight.to(torch.float16), half_bias).to(torch.float32)
        return func(*args, **kwargs)


class MixedFp16(nn.Module):
    """``module`` with its linear layers in fp16 (see ``Fp16Linear``); inputs and outputs stay fp32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.eval()

    def train(self, mode: bool = True) -> "MixedFp16":
        return super().train(False)

    def forward(self, features: Tensor, neighbors: Tensor, slide_offsets: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with Fp16Linear():
            return self.module(features, neighbors, slide_offsets)


def mixed_fp16(module: nn.Module) -> MixedFp16:
    """The fp16 variant of a frozen module: linear layers in fp16, the rest fp32, I/O fp32."""
    return MixedFp16(module)


# --------------------------------------------------------------------------- loading a run
@dataclass
class LoadedRun:
    """A run folder's fold models and what the manifest needs to say about them."""

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    models: list[nn.Module]          # as trained (the verification reference)
    metas: list[dict[str, Any]]
    folds: list[int]
    fold_records: dict[int, dict[str, Any]] = field(default_factory=dict)
    export_models: list[nn.Module] | None = None  # dense-GATv2 twins when the run trained PyG's GATv2Conv
    converted_from_pyg: bool = False

    @property
    def model_config(self) -> dict[str, Any]:
        return self.metas[0]["model_config"]

    @property
    def feature_dim(self) -> int:
        return int(self.metas[0]["in_dim"])

    @property
    def k(self) -> int:
        return int(self.model_config.get("k", 8))

    @property
    def graph_direction(self) -> str:
        return str(self.model_config.get("graph_direction", "paper"))

    @property
    def threshold(self) -> float:
        """The mean of the fold thresholds (what ``momkd evaluate`` uses for the fold-mean model)."""
        from momkd.train.runfolder import mean_threshold

        return mean_threshold([m["threshold"] for m in self.metas])

    @property
    def class_names(self) -> list[str]:
        names = self.config.get("class_names") or self.metas[0].get("class_names")
        return [str(n) for n in names] if names else ["negative", "positive"]

    @property
    def encoder(self) -> str | None:
        enc = self.config.get("encoder")
        if enc is None:
            enc = self.metas[0].get("encoder")
        return None if enc in (None, "") else str(enc)

    @property
    def preset(self) -> str:
        return str(self.config.get("preset") or self.metas[0].get("preset") or "paper")

    def ensemble(self) -> FrozenEnsemble:
        """The fold models exactly as trained: the reference every exported artifact is checked against."""
        return FrozenEnsemble(self.models)

    def export_ensemble(self) -> FrozenEnsemble:
        """What goes into the graph: the same weights, GATv2 layers in the dense (scatter-free) form."""
        return FrozenEnsemble(self.export_models or self.models)


def dense_twin(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """The same model rebuilt with ``gat_impl="dense"`` and the trained weights (the dense GATv2 layer keeps
    PyG GATv2Conv's parameter names, so the state dict loads as is)."""
    from momkd.config import ModelConfig
    from momkd.models import build_model

    cfg = ModelConfig.from_dict({**meta["model_config"], "gat_impl": "dense"})
    twin = build_model(cfg, meta["in_dim"], meta["omics_dim"])
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def load_run(run_dir: str | Path, fold: int | str | None = "all") -> LoadedRun:
    """Load the fold models of a finished run (``fold="all"``/``None``: every trained fold; an int: that fold).

    Raises ``RunFolderError`` (one line) for a missing or unfinished run folder or inconsistent folds.
    """
    from momkd.train.checkpoint import load_checkpoint
    from momkd.train.runfolder import CONFIG, SUMMARY, fold_dirs, read_run_json

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise RunFolderError(f"{run}: not a directory (expected a `momkd train` run folder)")
    which = None if fold in (None, "all") else int(fold)
    dirs = fold_dirs(run, which)   # the folds of summary.json: exactly those whose metrics the manifest reports
    config = read_run_json(run / CONFIG)
    summary = read_run_json(run / SUMMARY)
    models, metas, folds = [], [], []
    for d in dirs:
        try:
            model, meta = load_checkpoint(d, "cpu")
        except RunFolderError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as e:
            msg = " ".join(str(e).split())[:200]
            raise RunFolderError(f"{d}: checkpoint cannot be loaded ({type(e).__name__}: {msg})") from None
        if not hasattr(model, "forward_wsi"):
            raise RunFolderError(f"{d}: checkpoint model has no forward_wsi (not a momkd model)")
        models.append(model.eval())
        metas.append(meta)
        folds.append(int(meta.get("fold", int(d.name[5:]))))
    first = metas[0]
    for d, meta in zip(dirs, metas):
        for key in ("in_dim",):
            if meta.get(key) != first.get(key):
                raise RunFolderError(f"{d}: {key} {meta.get(key)} differs from fold {folds[0]}'s {first.get(key)}")
        for key in ("k", "graph_direction"):
            if meta["model_config"].get(key) != first["model_config"].get(key):
                raise RunFolderError(f"{d}: model {key} differs between folds; export folds one at a time (--fold K)")
        if "threshold" not in meta:
            raise RunFolderError(f"{d}: checkpoint has no decision threshold (model.json)")
    converted = False
    export_models = None
    if any(m["model_config"].get("gat_impl", "dense") != "dense" for m in metas):
        converted = True
        try:
            export_models = [dense_twin(model, meta) if meta["model_config"].get("gat_impl", "dense") != "dense"
                             else model for model, meta in zip(models, metas)]
        except (RuntimeError, KeyError, ValueError) as e:
            msg = " ".join(str(e).split())[:200]
            raise RunFolderError(f"{run}: PyG GATv2 weights cannot be moved to the dense layer ({msg})") from None
    records = {int(r["fold"]): r for r in summary.get("folds", []) if isinstance(r, dict) and "fold" in r}
    return LoadedRun(run_dir=run, config=config, summary=summary, models=models, metas=metas, folds=folds,
                     fold_records=records, export_models=export_models, converted_from_pyg=converted)
