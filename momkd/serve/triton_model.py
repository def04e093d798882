"""The Triton Python-backend model ``momkd serve`` runs: a thin adapter from Triton requests to
:class:`momkd.serve.service.SlideService` (wire protocol: :mod:`momkd.runtime.remote`).

Runs inside Triton's Python-backend stub, where ``triton_python_backend_utils`` is importable. Its settings come
from the model config's parameters (written by :func:`momkd.serve.repository.serving_config`). Every request of
a batch is checked on its own: a bad one gets an error response naming the problem (INVALID_ARG), the others
run. Tensors cross as the installed NumPy allows (:func:`input_array`, :func:`output_tensor`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from momkd.errors import MomkdError
from momkd.runtime.remote import (ATTENTION, COORDS, FEATURES, FEATURES_FP16, PARAM_MANIFEST_SHA256, PATCH_SCORE,
                                  PREDICTION, PROBABILITY)

from .service import SlideResult, SlideService


def config_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The string parameters of a model config (Triton hands it to ``initialize`` as JSON)."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


# The bundled stub is built against NumPy 1: under NumPy 2 its as_numpy() reads zeros and Tensor(name, array) sends
# empty data, so tensors cross by DLPack there; under NumPy 1 its DLPack capsules clash with NumPy's ("used_dlpack"
# vs "used_dltensor") and the stub dies, so they cross natively.
NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def input_array(tensor: Any) -> np.ndarray:
    """A request tensor as a NumPy array (a view of Triton's shared memory, valid while the request is)."""
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()


def output_tensor(pb: Any, name: str, array: np.ndarray) -> Any:
    """A response tensor ``name`` holding ``array``."""
    array = np.ascontiguousarray(array)
    return pb.Tensor.from_dlpack(name, array) if NUMPY_2 else pb.Tensor(name, array)


def request_arrays(pb: Any, request: Any) -> tuple[np.ndarray, np.ndarray] | str:
    """One request's slide: ``features`` (N, D) (from FP32 or FP16) and ``coords`` (N, 2), without the batch
    dimension; or the problem with the request."""
    fp32 = pb.get_input_tensor_by_name(request, FEATURES)
    fp16 = pb.get_input_tensor_by_name(request, FEATURES_FP16)
    coords = pb.get_input_tensor_by_name(request, COORDS)
    if (fp32 is None) == (fp16 is None):
        return f"send exactly one of {FEATURES!r} (FP32) or {FEATURES_FP16!r} (FP16)"
    if coords is None:
        return f"no {COORDS!r} input"
    features, xy = input_array(fp32 if fp32 is not None else fp16), input_array(coords)
    if features.shape[0] != 1 or xy.shape[0] != 1:
        return (f"send one slide per request (batch dimension 1), got {FEATURES} {tuple(features.shape)} and "
                f"{COORDS} {tuple(xy.shape)}")
    return features[0], xy[0]


class TritonPythonModel:
    """Triton's Python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = config_parameters(json.loads(args["model_config"]))
        self.service = SlideService(params["model_dir"], pinned_sha256=params[PARAM_MANIFEST_SHA256],
                                    max_rows=int(params["max_rows"]), backend=params.get("backend") or "auto",
                                    device=params.get("device") or None,
                                    threads=int(params["threads"]) if params.get("threads") else None,
                                    log=lambda m: print(f"momkd: {m}", flush=True))

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; a bad request's response carries the error."""
        errors: dict[int, str] = {}
        slides = []
        for i, request in enumerate(requests):
            got = request_arrays(self.pb, request)
            problem = got if isinstance(got, str) else self.service.check(*got)
            if problem is None and not isinstance(got, str):
                try:
                    slides.append(self.service.slide(got[0], got[1], i))
                except (MomkdError, ValueError) as e:   # coords the neighbour graph cannot use (duplicates)
                    problem = str(e)
            if problem is not None:
                errors[i] = problem
        try:
            results: dict[int, SlideResult | str] = self.service.run(slides) if slides else {}
        except Exception as e:  # noqa: BLE001 - a model that breaks the output contract fails its requests
            results = {s.index: f"inference failed ({type(e).__name__}: {e})" for s in slides}
        return [self._response(request, errors.get(i) or results[i]) for i, request in enumerate(requests)]

    def _response(self, request: Any, result: SlideResult | str) -> Any:
        pb = self.pb
        if isinstance(result, str):
            return pb.InferenceResponse(error=pb.TritonError(result, pb.TritonError.INVALID_ARG))
        wanted = set(request.requested_output_names())
        arrays = {PROBABILITY: np.array([[result.probability]], dtype=np.float32),
                  PREDICTION: np.array([[result.prediction]], dtype=np.int32),
                  ATTENTION: result.attention[None], PATCH_SCORE: result.patch_score[None]}
        tensors = [output_tensor(pb, name, a) for name, a in arrays.items()
                   if not wanted or name in wanted]
        return pb.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.service.close()
