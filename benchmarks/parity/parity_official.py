"""Access to the authors' released MoMKD code (CAIR-LAB-WFUSM/MoMKD) for the parity harness.

Nothing of theirs is copied here: their checkout is put on ``sys.path`` at run time (the folder the user gives
with ``--official-src`` or ``MOMKD_OFFICIAL_SRC``) and their modules are imported as they are. This module only
knows how to import them, build their model with the dimensions of their ``run.sh``, and drive their own
functions (``kneighbors_graph`` via ``graph.process_single_h5``, ``mkd_train_loop``, ``bootstrap_codebooks``,
``EarlyStopping``) with inputs we construct, and run their training step in float64 (:func:`train_step_float64`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import io
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Their top-level package/module names. They must come from their checkout, so none may be imported already.
OFFICIAL_TOP_LEVEL = ("models", "utils", "datasets", "vq", "graph")

# run.sh: RNA_FEATURE_DIM=768, WSI 1536 (hard-coded in train_mkd), WSI_ENCODER_DIM=512, RNA_EMBEDDING_DIM=512,
# SHARED_EMBEDDING_DIM=64, memory_size=16, CLS_HIDDEN_DIM=128 (attn_tau_init left at its default 0.2).
RUN_SH_DIMS = {
    "rna_input_dim": 768, "wsi_input_dim": 1536, "wsi_encoder_dim": 512, "rna_embedding_dim": 512,
    "shared_embedding_dim": 64, "num_memory_per_class": 16, "cls_hidden_dim": 128,
}

# utils/core_utils.py train_mkd: the train_hparams dict handed to mkd_train_loop (gc=0 here: no clipping, so the
# raw gradients can be compared; alpha_mem = 0.1 is hard-coded inside mkd_train_loop).
TRAIN_HPARAMS = {"alpha": 0.3, "task_weight": 0.5, "alpha_rna": 0.05, "alpha_wsi": 0.2, "margin": 0.3,
                 "gc": 0.0, "recon_weight": 0.05}
ALPHA_MEM = 0.1


class OfficialSourceError(RuntimeError):
    """The official checkout is missing, incomplete or cannot be imported."""


@dataclass
class Official:
    """Their imported modules."""

    src: Path
    mkd: types.ModuleType  # models/mkd.py (MKD, WsiEncoder, ...)
    train_utils: types.ModuleType  # utils/Mkd_train_utils.py (mkd_train_loop, PrototypicalAlignmentLoss)
    core_utils: types.ModuleType  # utils/core_utils.py (EarlyStopping, bootstrap_codebooks)
    graph: types.ModuleType  # graph.py (process_single_h5: kneighbors_graph -> edge_index)
    vq: types.ModuleType  # vq/vector_quantize_pytorch/vector_quantize_pytorch.py


def resolve_src(arg: str | None) -> Path:
    """``--official-src`` or ``$MOMKD_OFFICIAL_SRC``, checked to be their checkout."""
    value = arg or os.environ.get("MOMKD_OFFICIAL_SRC")
    if not value:
        raise OfficialSourceError("no official source: pass --official-src DIR or set MOMKD_OFFICIAL_SRC")
    src = Path(value).expanduser().resolve()
    missing = [p for p in ("models/mkd.py", "utils/core_utils.py", "utils/Mkd_train_utils.py", "graph.py",
                           "vq/vector_quantize_pytorch/vector_quantize_pytorch.py") if not (src / p).is_file()]
    if missing:
        raise OfficialSourceError(f"{src} is not a MoMKD checkout (missing {', '.join(missing)})")
    return src


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """A placeholder ``torchvision`` (with an empty ``transforms``).

    Why: ``utils/core_utils.py`` does ``from utils.utils import *`` and ``utils/utils.py`` has
    ``from torchvision import transforms`` at the top, but nothing we call (``EarlyStopping``,
    ``bootstrap_codebooks``) nor anything else in that module's import chain ever uses ``transforms``. torchvision
    is a torch-version-locked binary we do not install, so the import is satisfied by this empty module for the
    duration of that one import only (it is removed from ``sys.modules`` right after, so no other library is led
    to believe torchvision is installed).
    """
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tr = types.ModuleType("torchvision.transforms")
    tr.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    tv.transforms = tr  # type: ignore[attr-defined]
    return {"torchvision": tv, "torchvision.transforms": tr}


def load(src: Path) -> Official:
    """Import their modules from ``src`` (idempotent within one process)."""
    for name in OFFICIAL_TOP_LEVEL:
        mod = sys.modules.get(name)
        if mod is not None:
            origin = Path(getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", [""])), "")).resolve()
            if src not in origin.parents:
                raise OfficialSourceError(f"a module named {name!r} is already imported from {origin}; run the "
                                          "harness in a fresh process")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    os.environ.setdefault("MPLBACKEND", "Agg")  # utils/utils.py imports matplotlib.pyplot
    try:
        mkd = importlib.import_module("models.mkd")  # pulls torch_geometric before any stub exists
        vq = importlib.import_module("vq.vector_quantize_pytorch.vector_quantize_pytorch")
        graph = importlib.import_module("graph")
        train_utils = importlib.import_module("utils.Mkd_train_utils")
        stub = {}
        if importlib.util.find_spec("torchvision") is None:
            stub = _torchvision_stub()
            sys.modules.update(stub)
        try:
            core_utils = importlib.import_module("utils.core_utils")
        finally:
            for name, mod in stub.items():
                if sys.modules.get(name) is mod:
                    del sys.modules[name]
    except ImportError as exc:
        raise OfficialSourceError(f"cannot import the official code from {src}: {exc}") from exc
    return Official(src, mkd, train_utils, core_utils, graph, vq)


def build_model(off: Official, seed: int) -> Any:
    """Their ``MKD`` with run.sh dimensions, initialised from ``torch.manual_seed(seed)``."""
    import torch

    torch.manual_seed(seed)
    return off.mkd.MKD(**RUN_SH_DIMS)


def disable_dropout(model: Any) -> None:
    """Every dropout of their model off: ``nn.Dropout`` p (RNA tower/decoder, classifier), the encoder's
    feature dropout (``WsiEncoder.dropout``, used by ``F.dropout``) and GATv2Conv's attention dropout."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.wsi_encoder.dropout = 0.0
    model.wsi_encoder.gat1.dropout = 0.0
    model.wsi_encoder.gat2.dropout = 0.0


def edge_index(off: Official, coords: np.ndarray, k: int = 8) -> np.ndarray:
    """Their graph of ``coords`` through their own ``graph.process_single_h5`` (``kneighbors_graph(coords, k,
    include_self=False).nonzero()`` stacked as [query row, neighbour]): (2, E) int64."""
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.h5", Path(tmp) / "out.h5"
        with h5py.File(src, "w") as hf:
            hf["coords"] = coords
        status = off.graph.process_single_h5(str(src), str(dst), k_neighbors=k, force_recompute=True)
        if status != "success":
            raise OfficialSourceError(f"their graph.process_single_h5 returned {status!r}")
        with h5py.File(dst, "r") as hf:
            return np.asarray(hf[f"edge_index_k{k}"][:], dtype=np.int64)


class RecordingF:
    """Stands in for ``torch.nn.functional`` inside their ``models.mkd`` while one call runs: records every
    ``normalize`` output and every ``softmax`` input, delegates everything to the real module."""

    def __init__(self, real: types.ModuleType) -> None:
        self._real = real
        self.normalized: list[Any] = []
        self.softmax_inputs: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def normalize(self, *args: Any, **kwargs: Any) -> Any:
        out = self._real.normalize(*args, **kwargs)
        self.normalized.append(out)
        return out

    def softmax(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        self.softmax_inputs.append(input)
        return self._real.softmax(input, *args, **kwargs)


@contextlib.contextmanager
def recording_functional(off: Official):
    """Within the block their ``models.mkd`` sees a :class:`RecordingF` as ``F``."""
    real = off.mkd.F
    rec = RecordingF(real)
    off.mkd.F = rec
    try:
        yield rec
    finally:
        off.mkd.F = real


class GradRecorder:
    """A stand-in optimiser for their ``mkd_train_loop``: ``step()`` snapshots every parameter's gradient by
    name (instead of updating anything), ``zero_grad()`` clears them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.param_groups = [{"lr": 0.0}]
        self.grads: dict[str, Any] = {}

    def step(self) -> None:
        self.grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
                      for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model.parameters():
            p.grad = None


def train_step(off: Official, model: Any, features: Any, edges: Any, rna: Any, label: int) -> dict[str, Any]:
    """One step of THEIR ``mkd_train_loop`` on a one-slide loader (gc = 0, optimiser replaced by
    :class:`GradRecorder`). Returns their loss terms, their total (the tensor their loop calls ``backward`` on),
    their ``forward_train`` outputs and the gradients."""
    import torch

    lab = torch.tensor([label], dtype=torch.long)
    loader = [((features, edges), rna, lab, "slide")]
    opt = GradRecorder(model)
    outs: list[dict[str, Any]] = []
    totals: list[Any] = []
    forward_train = model.forward_train
    backward = torch.Tensor.backward

    def record_forward(*args: Any, **kwargs: Any) -> Any:
        outs.append(forward_train(*args, **kwargs))
        return outs[-1]

    def record_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        totals.append(self.detach().clone())
        return backward(self, *args, **kwargs)

    model.forward_train = record_forward
    torch.Tensor.backward = record_backward  # type: ignore[method-assign]
    try:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            terms = off.train_utils.mkd_train_loop(0, model, loader, opt, dict(TRAIN_HPARAMS), torch.device("cpu"))
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        del model.forward_train
    if len(totals) != 1 or len(outs) != 1:
        raise OfficialSourceError(f"their train loop ran {len(outs)} forward / {len(totals)} backward calls, "
                                  "expected one of each")
    return {"terms": terms, "total": totals[0], "out": outs[0], "grads": opt.grads}


@contextlib.contextmanager
def float64_kept():
    """Within the block ``Tensor.float()`` returns a float64 tensor as it is (every other dtype is cast as usual).

    Their VQ codebook's forward starts with ``x = x.float()`` (``vector_quantize_pytorch.py``), the only cast to
    float32 on their training path; with it neutralised their model runs in float64 after ``.double()``. What
    stays float32 is their VQ loss accumulator (``torch.tensor([0.])``): ``mem_loss`` is a float32 value, and the
    gradient that flows back through it (``alpha_mem = 0.1``, rounded to float32) carries one float32 rounding.
    """
    import torch

    cast = torch.Tensor.float

    def keep_float64(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self if self.dtype == torch.float64 else cast(self, *args, **kwargs)

    torch.Tensor.float = keep_float64  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.float = cast  # type: ignore[method-assign]


def train_step_float64(off: Official, model: Any, features: Any, edges: Any, rna: Any,
                       label: int) -> dict[str, Any]:
    """:func:`train_step` on a float64 copy of ``model`` (``model`` itself is left as it is), with float64
    inputs, under :func:`float64_kept`: the gradient of their computation without float32 rounding."""
    with float64_kept():
        return train_step(off, copy.deepcopy(model).double(), features.double(), edges, rna.double(), label)


def bootstrap(off: Official, model: Any, slides: list[tuple[Any, Any, int]], seed: int,
              iters: int = 20) -> dict[str, Any]:
    """THEIR ``bootstrap_codebooks`` over a fake loader of ``(features, edge_index, label)`` slides, with torch's
    global RNG seeded by ``seed`` (their k-means draws its initial centroids with ``torch.randperm``). Returns
    the resulting unit codebooks and the patch projections it clustered (recorded from their projector)."""
    import torch
    import torch.nn.functional as F

    loader = [((x, e), None, torch.tensor([y]), f"s{i}") for i, (x, e, y) in enumerate(slides)]
    recorded: list[Any] = []
    hook = model.wsi_patch_projector.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach()))
    try:
        torch.manual_seed(seed)
        off.core_utils.bootstrap_codebooks(loader, model, torch.device("cpu"), max_per_class=10**12,
                                           kmeans_iters=iters)
    finally:
        hook.remove()
    proj = [F.normalize(r, p=2, dim=-1) for r in recorded]  # the same call their loop makes on this output
    pos = torch.cat([p for p, (_, _, y) in zip(proj, slides) if y == 1])
    neg = torch.cat([p for p, (_, _, y) in zip(proj, slides) if y == 0])
    return {"pos": model.mem_pos.codebook.detach().clone(), "neg": model.mem_neg.codebook.detach().clone(),
            "proj_pos": pos, "proj_neg": neg}


def early_stopping_decisions(off: Official, sequence: list[float], patience: int, stop_epoch: int,
                             ckpt_dir: str) -> list[tuple[bool, bool]]:
    """Feed ``sequence`` (0-indexed epochs) to THEIR ``EarlyStopping(patience, stop_epoch)`` as their train loop
    does (stop at the first ``early_stop``). Returns (checkpoint saved, early_stop) per epoch run."""
    from torch import nn

    stopper = off.core_utils.EarlyStopping(patience=patience, stop_epoch=stop_epoch, verbose=False)
    saved: list[bool] = []
    save = stopper.save_checkpoint

    def record_save(*args: Any, **kwargs: Any) -> None:
        saved[-1] = True
        save(*args, **kwargs)

    stopper.save_checkpoint = record_save
    tiny = nn.Linear(1, 1)
    out = []
    for epoch, auc in enumerate(sequence):
        saved.append(False)
        stopper(epoch, auc, tiny, ckpt_name=os.path.join(ckpt_dir, "checkpoint.pt"))
        out.append((saved[-1], bool(stopper.early_stop)))
        if stopper.early_stop:
            break
    return out
