"""The ``momkd::memory_head`` operator: one name, two implementations, chosen by PyTorch's dispatcher.

* default (CPU and any device without a kernel): ``momkd.kernels.reference.head_reference``, the torch reference;
* CUDA: the fused Triton kernel (``momkd.kernels.memory_head.fused_memory_head``), unless Triton is missing or
  ``MOMKD_FUSED_HEAD=0`` is set, in which case the reference runs there too.

Signature: ``memory_head(embeddings (N, D), weight (D_N, D), bias (D_N,), codes_pos (n, D_N), codes_neg (n, D_N),
slide_offsets (B+1,) int64, tau () float32) -> (score (N,), attention (N,), pooled (B, D))``, outputs in the
embeddings' dtype. It has no autograd formula: :func:`use_operator` keeps training on the reference.

Because it is a registered operator, ``torch.jit.trace`` records it as one node: the exported TorchScript twin
(``model.pt``) runs the kernel when loaded on CUDA and the reference on CPU. Loading such a model needs this module
imported first (the runtime's torch backend does that). The ONNX export never sees it (:func:`use_operator`
answers False while exporting), so ``model.onnx`` holds the plain torch reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

FUSED_ENV = "MOMKD_FUSED_HEAD"  # "0": never run the Triton kernel (A/B timings, debugging)


@functools.cache
def triton_available() -> bool:
    """True if the ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def fused_enabled() -> bool:
    """The Triton kernel may run: Triton is installed and ``MOMKD_FUSED_HEAD`` is not "0"."""
    return os.environ.get(FUSED_ENV, "1") != "0" and triton_available()


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def use_operator(embeddings: Tensor, weight: Tensor, tau: float | Tensor) -> bool:
    """Should the head call ``momkd::memory_head`` rather than the reference ops inline?

    No while exporting (ONNX / torch.export: the graph must hold plain ops) or while autograd records (the
    operator is forward-only). Yes while TorchScript-tracing (the traced module then dispatches by device at run
    time) and for CUDA inputs when the kernel may run. No otherwise (CPU eager: the reference, inline).
    """
    if _exporting():
        return False
    if torch.is_grad_enabled() and (embeddings.requires_grad or weight.requires_grad
                                    or (isinstance(tau, Tensor) and tau.requires_grad)):
        return False
    if torch.jit.is_tracing():
        return True
    return embeddings.device.type == "cuda" and fused_enabled()


def tau_tensor(tau: float | Tensor, like: Tensor) -> Tensor:
    """The temperature as a 0-dim tensor on ``like``'s device (float32 unless already a tensor)."""
    if isinstance(tau, Tensor):
        return tau
    return torch.full((), float(tau), dtype=torch.float32, device=like.device)


def _reference(embeddings: Tensor, weight: Tensor, bias: Tensor, codes_pos: Tensor, codes_neg: Tensor,
               slide_offsets: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from momkd.kernels.reference import head_reference

    out = head_reference(embeddings, weight, bias, codes_pos, codes_neg, slide_offsets, tau)
    dtype = embeddings.dtype
    return out.score.to(dtype), out.attention.to(dtype), out.pooled.to(dtype)


@torch.library.custom_op("momkd::memory_head", mutates_args=())
def memory_head(embeddings: Tensor, weight: Tensor, bias: Tensor, codes_pos: Tensor, codes_neg: Tensor,
                slide_offsets: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Memory head of packed slides (eq. 6-8); see the module docstring. Default implementation: the reference."""
    return _reference(embeddings, weight, bias, codes_pos, codes_neg, slide_offsets, tau)


@memory_head.register_kernel("cuda")
def _memory_head_cuda(embeddings: Tensor, weight: Tensor, bias: Tensor, codes_pos: Tensor, codes_neg: Tensor,
                      slide_offsets: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not fused_enabled():
        return _reference(embeddings, weight, bias, codes_pos, codes_neg, slide_offsets, tau)
    from momkd.kernels.memory_head import fused_memory_head

    return fused_memory_head(embeddings, weight, bias, codes_pos, codes_neg, slide_offsets, tau)


@memory_head.register_fake
def _memory_head_fake(embeddings: Tensor, weight: Tensor, bias: Tensor, codes_pos: Tensor, codes_neg: Tensor,
                      slide_offsets: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, dim = embeddings.shape
    return embeddings.new_empty(n), embeddings.new_empty(n), embeddings.new_empty(slide_offsets.shape[0] - 1, dim)
