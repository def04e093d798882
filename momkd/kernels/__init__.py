"""Fused GPU kernels (Triton) for inference, each an alternative implementation of existing torch code.

* :mod:`momkd.kernels.ops` registers the ``momkd::memory_head`` operator: its default implementation is the
  torch reference head (``momkd.kernels.reference.head_reference``); on CUDA it runs the Triton kernel. Importing it
  needs torch only (Triton is imported on the first CUDA call).
* :mod:`momkd.kernels.memory_head` holds the Triton kernel and its launcher (imports Triton).
"""
