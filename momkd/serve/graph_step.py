"""The graph-building step of the exported Triton repository (``momkd export --format triton``): a Python-backend
model that checks each request's slide and returns its neighbour table, built with the function ``momkd infer``
uses, padded to the fixed width the ONNX step's ragged batching needs.

Inputs per request (batch dimension 1): ``features (1, N, D)`` FP32 (checked: D, N = 0, NaN/Inf, matching N;
not returned, the ensemble feeds it to the model step itself) and ``coords (1, N, 2)`` INT64. Output:
``neighbors_local (1, N, W)`` INT64, the slide's own row indices, -1 padded (the model step shifts them to the
packed batch's rows). Config parameters: ``feature_dim``, ``k``, ``direction``, ``neighbor_width``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from momkd.errors import MomkdError
from momkd.graph import neighbor_table

from .service import check_request
from .triton_model import config_parameters, output_tensor, request_arrays

NEIGHBORS_LOCAL = "neighbors_local"


def padded_neighbors(coords: np.ndarray, k: int, direction: str, width: int) -> np.ndarray | str:
    """``neighbor_table(coords, k, direction)`` right-padded with -1 to ``width`` columns -> (N, width) int64, or
    the problem (a table wider than ``width``)."""
    table = neighbor_table(coords, k=k, direction=direction)
    if table.shape[1] > width:
        return (f"the slide's neighbour table is {table.shape[1]} wide, more than this repository's "
                f"neighbor_width {width} (re-export with a larger --neighbor-width)")
    out = np.full((table.shape[0], width), -1, dtype=np.int64)
    out[:, :table.shape[1]] = table
    return out


class GraphStepModel:
    """Triton's Python-backend entry points for the graph step (``initialize``, ``execute``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = config_parameters(json.loads(args["model_config"]))
        self.feature_dim = int(params["feature_dim"])
        self.k = int(params["k"])
        self.direction = params["direction"]
        self.width = int(params["neighbor_width"])

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        pb = self.pb
        got = request_arrays(pb, request)
        result: np.ndarray | str = got if isinstance(got, str) else (
            check_request(got[0], got[1], self.feature_dim) or self._table(got[1]))
        if isinstance(result, str):
            return pb.InferenceResponse(error=pb.TritonError(result, pb.TritonError.INVALID_ARG))
        return pb.InferenceResponse(output_tensors=[output_tensor(pb, NEIGHBORS_LOCAL, result[None])])

    def _table(self, coords: np.ndarray) -> np.ndarray | str:
        try:
            return padded_neighbors(np.asarray(coords, dtype=np.int64), self.k, self.direction, self.width)
        except (MomkdError, ValueError) as e:   # coords the neighbour graph cannot use (duplicates)
            return str(e)
