"""Model and loss configuration, and the two presets ("paper", "official"). No torch import.

``preset("paper")`` follows the CVPR 2026 paper's text (§3, eq. 1-10); ``preset("official")`` reproduces what
the authors' released code runs (see ``shared/reference/official-code.md``). Every choice the paper leaves
open is documented on the field it concerns and in ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from momkd.errors import MomkdError
from momkd.graph import DIRECTIONS as GRAPH_DIRECTIONS

MODELS = ("momkd", "abmil")
MEMORY_UPDATES = ("gradient", "ema", "fixed")
GAT_IMPLS = ("dense", "pyg")
CLASSIFIERS = ("linear", "mlp")
OMICS_LAYOUTS = ("paper", "official")
LOSS_FORMS = ("paper", "official")
PRESETS = ("paper", "official")


class ConfigError(MomkdError, ValueError):
    """An invalid model/loss configuration value (one line, names the field)."""


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)} (got {value!r})")


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{name} must be in {bracket}{lo}, {hi}] (got {value!r})")


class _Dict:
    """JSON round trip shared by the config dataclasses (unknown keys are refused, missing keys default)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any):  # noqa: ANN201
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass
class ModelConfig(_Dict):
    """Architecture of MoMKD (or the ABMIL baseline). Defaults are the ``paper`` preset."""

    model: str = "momkd"  # "momkd" | "abmil" (histology-only gated-attention baseline)
    # --- WSI graph encoder (§3.2): two GATv2 layers, `heads` heads of dim/heads channels each (concat)
    dim: int = 256  # D. The paper says D = 256 in §3.2 and "D = 128" under eq. 8; we follow §3.2 / DESIGN.
    heads: int = 2
    dropout: float = 0.25  # feature dropout after each GATv2 block (paper: not stated; DESIGN value)
    attn_dropout: float = 0.0  # dropout on GATv2 attention coefficients (paper: not stated -> PyG default 0)
    gat_impl: str = "dense"  # "dense" (DenseGATv2Conv, exportable) | "pyg" (torch_geometric GATv2Conv)
    graph_direction: str = "paper"  # "paper": gather from own k-NN; "official": reverse k-NN (authors' code)
    k: int = 8
    # --- projections and memory (§3.3)
    proj_dim: int = 128  # D_N
    n_codes: int = 16  # codes per bank (n)
    memory_update: str = "gradient"  # "gradient" (codes are parameters) | "ema" | "fixed" (codes are buffers)
    ema_momentum: float = 0.99  # m in c <- normalize(m c + (1 - m) mean(assigned patch projections))
    kmeans_patches: int = 10000  # patch projections per class for the spherical k-means initialisation
    separate_slide_proj: bool = True  # eq. 1 W_C-wsi separate from the patch projection W_proj (False: shared)
    # --- attention pooling (eq. 6-8)
    tau: float = 0.2
    learnable_tau: bool = False  # official: tau = exp(log_tau), init `tau`, clamped to [tau_min, tau_max]
    tau_min: float = 0.01
    tau_max: float = 2.0
    # --- classifier g (eq. 8)
    classifier: str = "linear"  # "linear" | "mlp" (LayerNorm -> hidden -> ReLU -> Dropout -> 2)
    classifier_hidden: int = 128
    classifier_dropout: float = 0.5
    # --- omics autoencoder (§3.2, eq. 2)
    omics_hidden: int = 512  # paper: "lightweight MLP" (size not stated); the authors use 512
    omics_dropout: float = 0.25
    # "paper": encoder (Linear, LayerNorm, ReLU, Dropout) x 2; "official": one such block then a plain Linear
    # (the authors' RnaEncoder). The decoder is the same in both: one block then a plain Linear.
    omics_layout: str = "paper"

    def __post_init__(self) -> None:
        _check_choice("model", self.model, MODELS)
        _check_choice("memory_update", self.memory_update, MEMORY_UPDATES)
        _check_choice("gat_impl", self.gat_impl, GAT_IMPLS)
        _check_choice("graph_direction", self.graph_direction, GRAPH_DIRECTIONS)
        _check_choice("classifier", self.classifier, CLASSIFIERS)
        _check_choice("omics_layout", self.omics_layout, OMICS_LAYOUTS)
        for name in ("dim", "heads", "proj_dim", "n_codes", "k", "classifier_hidden", "omics_hidden",
                     "kmeans_patches"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)!r})")
        if self.dim % self.heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        for name in ("dropout", "attn_dropout", "classifier_dropout", "omics_dropout"):
            _check_range(name, getattr(self, name), 0.0, 0.99)
        _check_range("ema_momentum", self.ema_momentum, 0.0, 1.0)
        if not 0 < self.tau_min <= self.tau_max:
            raise ConfigError(f"need 0 < tau_min <= tau_max (got {self.tau_min}, {self.tau_max})")
        if not self.tau_min <= self.tau <= self.tau_max:
            raise ConfigError(f"tau must be in [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}] (got {self.tau})")


@dataclass
class LossConfig(_Dict):
    """Weights and forms of the training objective (eq. 9). Defaults are the ``paper`` preset."""

    lambda_ce: float = 0.5
    lambda_mse: float = 0.01
    alpha_wsi: float = 0.2
    alpha_omics: float = 0.05
    lambda_mem: float = 0.1
    # eq. 3-5
    tau_agg: float = 5.0
    beta: float = 20.0
    margin: float = 0.3
    align_detach_memory: bool = False  # paper: the memory receives the alignment gradients (it "evolves")
    # eq. 10 orthogonality: "paper" = sum_{i != j} cos^2(c_i, c_j) on each bank, both banks summed;
    # "official" = (sum_{all i, j} cos^2 / n^2 - 1 / n) on the label's bank only (the authors' VQ regulariser)
    orth_form: str = "paper"
    orth_weight: float = 1.0  # multiplies the orthogonality term inside L_mem (official: 10)
    # eq. 10 commitment: "paper" = mean_i ||F_P,i - sg(c_k*)||^2 over patches, c = unit codes of the label's
    # bank, k* = argmin Euclidean; the memory gets no gradient. "official" = MSE(sg(c_k*), F_P) over elements
    # with the raw (un-normalised) codes, k* = argmin of the authors' VQ distance: their VectorQuantize has
    # learnable_codebook=False, so the quantised codes are detached and the codes get no gradient from it either.
    commit_form: str = "paper"
    reconstruction: bool = True  # omics reconstruction loss on/off (ablation "no reconstruction")

    def __post_init__(self) -> None:
        _check_choice("orth_form", self.orth_form, LOSS_FORMS)
        _check_choice("commit_form", self.commit_form, LOSS_FORMS)
        for name in ("lambda_ce", "lambda_mse", "alpha_wsi", "alpha_omics", "lambda_mem", "orth_weight", "beta",
                     "margin"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)!r})")
        if self.tau_agg <= 0:
            raise ConfigError(f"tau_agg must be > 0 (got {self.tau_agg!r})")


def preset(name: str) -> tuple[ModelConfig, LossConfig]:
    """The ``paper`` or ``official`` configuration (fresh objects, safe to modify)."""
    _check_choice("preset", name, PRESETS)
    if name == "paper":
        return ModelConfig(), LossConfig()
    model = ModelConfig(
        dim=512, heads=2, proj_dim=64, n_codes=16, omics_hidden=512, omics_dropout=0.25,
        dropout=0.5, attn_dropout=0.5, tau=0.2, learnable_tau=True, tau_min=0.01, tau_max=2.0,
        graph_direction="official", memory_update="gradient", classifier="mlp", classifier_hidden=128,
        classifier_dropout=0.5, kmeans_patches=50000, separate_slide_proj=True, omics_layout="official",
    )
    loss = LossConfig(lambda_mse=0.05, orth_form="official", orth_weight=10.0, commit_form="official")
    return model, loss


def ablation(model: ModelConfig, loss: LossConfig, name: str) -> tuple[ModelConfig, LossConfig]:
    """Table 3 ablations: ``no_align_omics`` (alpha_omics = 0), ``no_align_wsi`` (alpha_wsi = 0),
    ``no_recon`` (no reconstruction), ``fixed_memory`` (memory frozen after k-means)."""
    if name == "no_align_omics":
        return model, loss.replace(alpha_omics=0.0)
    if name == "no_align_wsi":
        return model, loss.replace(alpha_wsi=0.0)
    if name == "no_recon":
        return model, loss.replace(reconstruction=False)
    if name == "fixed_memory":
        return model.replace(memory_update="fixed"), loss
    raise ConfigError(f"unknown ablation {name!r} (no_align_omics, no_align_wsi, no_recon, fixed_memory)")
