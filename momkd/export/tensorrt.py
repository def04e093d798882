"""TensorRT engine (``model.plan``) from the exported ONNX graph, with the TensorRT 10 Python API.

TensorRT is imported lazily: it cannot be installed on our development/CI machines (its library wheel comes
from a host they cannot reach) and is absent from our GPU test machine too, so this code path runs only where
``tensorrt`` and a CUDA GPU exist (its tests are marked ``tensorrt`` and skip elsewhere). Without it, export
stops with ``TensorRTUnavailableError`` after the ONNX model folder has been written.

The engine has one optimisation profile over the three dynamic dimensions: rows N of a packed batch, width W
of the neighbour table and slides B (``slide_offsets`` has B+1 entries). ``momkd.runtime``'s TensorRT backend
reads profile 0 of ``features`` and ``slide_offsets`` to size its packs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from momkd.errors import MomkdError

PLAN_NAME = "model.plan"
TIMING_CACHE_NAME = "timing.cache"
INSTALL_HINT = "--format trt needs the 'tensorrt' package and a CUDA GPU (pip install momkd[gpu])"


class TensorRTUnavailableError(MomkdError):
    """``--format trt`` on a machine without TensorRT or without a CUDA GPU."""


class TensorRTBuildError(MomkdError):
    """TensorRT could not parse the ONNX graph or build the engine."""


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) of each dynamic dimension."""

    rows: tuple[int, int, int] = (1, 20000, 200000)
    width: tuple[int, int, int] = (1, 8, 64)
    slides: tuple[int, int, int] = (1, 8, 256)

    def shapes(self, feature_dim: int) -> dict[str, dict[str, list[int]]]:
        """Per input name: {"min": shape, "opt": shape, "max": shape} (what the manifest records)."""
        out: dict[str, dict[str, list[int]]] = {"features": {}, "neighbors": {}, "slide_offsets": {}}
        for i, key in enumerate(("min", "opt", "max")):
            out["features"][key] = [self.rows[i], feature_dim]
            out["neighbors"][key] = [self.rows[i], self.width[i]]
            out["slide_offsets"][key] = [self.slides[i] + 1]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}


def default_profile(k: int, graph_direction: str) -> Profile:
    """Rows 1..200000 (opt 20000), width 1..max(k, 64) (opt k; the reverse-kNN table of the official preset is
    wider than k on irregular tissue), slides 1..256 (opt 8)."""
    return Profile(width=(1, max(1, k), max(k, 64)))


def require_tensorrt(onnx_written_to: Path | None = None) -> Any:
    """``import tensorrt`` or a one-line ``TensorRTUnavailableError``."""
    suffix = f"; the ONNX model was still written to {onnx_written_to}" if onnx_written_to else ""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailableError(INSTALL_HINT + suffix) from None
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer, CUDA driver) raises others
        raise TensorRTUnavailableError(f"{INSTALL_HINT} (import tensorrt failed: {' '.join(str(e).split())[:160]})"
                                       + suffix) from None
    return trt


def cuda_device_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - only a label for the engine's metadata: no name rather than no engine
        pass
    return None


def build_engine(onnx_path: Path, plan_path: Path, feature_dim: int, profile: Profile, fp16: bool = False,
                 timing_cache: Path | None = None, workspace_bytes: int | None = None,
                 onnx_written_to: Path | None = None) -> dict[str, Any]:
    """Parse ``onnx_path``, build a serialized engine with ``profile`` (FP16 when asked), write ``plan_path`` and
    the timing cache beside it. Returns the manifest's ``tensorrt`` section (without the checksum)."""
    trt = require_tensorrt(onnx_written_to)
    suffix = f"; the ONNX model was still written to {onnx_written_to}" if onnx_written_to else ""
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # noqa: BLE001 - no CUDA device / driver
        raise TensorRTUnavailableError(f"{INSTALL_HINT} (TensorRT found no usable CUDA GPU: "
                                       f"{' '.join(str(e).split())[:160]}){suffix}") from None
    if builder is None:
        raise TensorRTUnavailableError(f"{INSTALL_HINT} (TensorRT found no usable CUDA GPU){suffix}")
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path}: TensorRT cannot parse the ONNX graph ({errors[:300]}){suffix}")

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls drift by ~1e-3
    opt = builder.create_optimization_profile()
    for name, shapes in profile.shapes(feature_dim).items():
        opt.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    if config.add_optimization_profile(opt) < 0:
        raise TensorRTBuildError(f"TensorRT rejected the optimisation profile {profile.to_dict()}{suffix}")

    cache_path = timing_cache or plan_path.with_name(TIMING_CACHE_NAME)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build the engine from {onnx_path} (see the TensorRT log above)"
                                 f"{suffix}")
    plan_path.write_bytes(memoryview(serialized))
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return {
        "file": plan_path.name,
        "profiles": [profile.shapes(feature_dim)],
        "precision": "fp16" if fp16 else "fp32",
        "device": cuda_device_name(),
        "tensorrt_version": getattr(trt, "__version__", None),
        "timing_cache": cache_path.name,
    }


def engine_runner(plan_path: Path) -> Any:
    """A callable (features, neighbors, offsets) -> outputs dict running the engine (the runtime's backend)."""
    from momkd.runtime.backends import TensorRTBackend

    backend = TensorRTBackend(plan_path, device="cuda")
    return backend.run
