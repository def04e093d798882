"""Remote inference on Triton Inference Server: the wire protocol of ``momkd serve`` and the client engine
``momkd infer --server URL`` runs instead of a local backend (no PyTorch; needs ``tritonclient``: momkd[serve]).

One request is one slide (Triton's batch dimension first, always 1)::

    features       (1, N, D) FP32    or  features_fp16 (1, N, D) FP16     (exactly one of the two)
    coords         (1, N, 2) INT64
    -> probability (1, 1)    FP32    the slide's probability of the model's second class
       prediction  (1, 1)    INT32   index into the model's class names (probability >= threshold -> 1)
       attention   (1, N)    FP32    optional: only when requested
       patch_score (1, N)    FP32    optional: only when requested

Triton's dynamic batcher hands the server's model the requests waiting (ragged: any N); the model builds each
neighbour table from ``coords`` with the function ``momkd infer`` uses and packs the slides into ragged packs
up to its row budget. The served model's Triton config carries the
manifest's sha256 (:data:`PARAM_MANIFEST_SHA256`): the client refuses a server that serves another model.

:class:`RemoteBackend` sends the slides of a pack concurrently, round-robin over the servers with at most
``max_inflight`` requests in flight per server; a request that fails because its server is gone (connection
refused or reset, unavailable, timed out) is retried on another server, a request the server rejects is that
slide's error. When no server answers for ``retry_window_s`` the run stops with :class:`RemoteUnavailableError`
(the rows finished so far are kept: rerun with ``--resume``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from momkd.data.batch import Pack
from momkd.manifest import Manifest

from .backends import BackendError

DEFAULT_MODEL_NAME = "momkd"
FEATURES = "features"
FEATURES_FP16 = "features_fp16"
COORDS = "coords"
PROBABILITY = "probability"
PREDICTION = "prediction"
ATTENTION = "attention"
PATCH_SCORE = "patch_score"
PARAM_MANIFEST_SHA256 = "manifest_sha256"
FEATURE_DTYPES = {"fp32": (FEATURES, "FP32", np.float32), "fp16": (FEATURES_FP16, "FP16", np.float16)}
PROTOCOLS = ("http", "grpc")

DEFAULT_MAX_INFLIGHT = 4          # requests in flight per server
DEFAULT_RETRY_WINDOW_S = 30.0     # how long a slide waits for some server to answer before the run stops
DOWN_COOLDOWN_S = 1.0             # a server that failed a request gets no new one for this long
REQUEST_TIMEOUT_S = 600.0         # one request (a 100k-patch slide on a busy server fits)
# statuses of a request whose server is gone or overloaded (retried elsewhere); any other answer is the slide's
RETRYABLE_STATUSES = {None, "502", "503", "504", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
                      "StatusCode.CANCELLED", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.UNKNOWN"}


class RemoteUnavailableError(BackendError):
    """No server answered a request within the retry window (the run stops; rerun with --resume)."""


class RemoteSlideError(Exception):
    """A server rejected one slide's request (its message names the problem); that slide's error, not the run's."""


def _tritonclient(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as e:
        raise BackendError(f"--server needs tritonclient (pip install momkd[serve]): {e}") from None
    return client


def parse_server_url(url: str) -> tuple[str, str]:
    """``http://host:port`` | ``grpc://host:port`` | ``host:port`` (HTTP) -> (protocol, "host:port")."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in PROTOCOLS:
        raise BackendError(f"--server {url!r}: the scheme must be http:// or grpc://")
    if not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise BackendError(f"--server {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{parts.port}"


def _status(e: BaseException) -> str | None:
    status = getattr(e, "status", None)
    return status() if callable(status) else None


def _is_answer(e: BaseException) -> bool:
    """True when ``e`` is a server's answer about this request (not a server that is gone or overloaded)."""
    from tritonclient.utils import InferenceServerException

    return isinstance(e, InferenceServerException) and _status(e) not in RETRYABLE_STATUSES


def _message(e: BaseException) -> str:
    msg = getattr(e, "message", None)
    text = msg() if callable(msg) else str(e)
    return " ".join(str(text).split())


@dataclass(eq=False)
class _Server:
    url: str
    protocol: str
    address: str
    slots: threading.Semaphore
    down_until: float = 0.0
    local: threading.local = field(default_factory=threading.local)   # one client per thread (http is not shared)

    def client(self, timeout_s: float) -> Any:
        c = getattr(self.local, "client", None)
        if c is None:
            module = _tritonclient(self.protocol)
            if self.protocol == "http":
                c = module.InferenceServerClient(self.address, connection_timeout=min(timeout_s, 10.0),
                                                 network_timeout=timeout_s)
            else:
                c = module.InferenceServerClient(self.address)
            self.local.client = c
        return c

    def forget_client(self) -> None:
        c = getattr(self.local, "client", None)
        self.local.client = None
        if c is not None:
            with contextlib.suppress(Exception):   # closing a broken connection may raise anything
                c.close()


class RemoteBackend:
    """The runtime's compute engine for ``momkd infer --server``: packs go to Triton servers slide by slide.

    Implements the pipeline's ``run_pack(pack)`` seam (the server needs each slide's coords, which the local
    ``Backend.run`` signature does not carry): returns ``probability (B,)``, ``attention (N,)`` and
    ``patch_score (N,)`` for the pack's B slides and N rows, as a local backend would.
    """

    name = "triton"
    device = "remote"
    needs_coords = True
    max_rows: int | None = None
    max_slides: int | None = None

    def __init__(self, urls: Sequence[str], manifest_sha256: str, feature_dim: int, *,
                 model_name: str = DEFAULT_MODEL_NAME, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 retry_window_s: float = DEFAULT_RETRY_WINDOW_S, timeout_s: float = REQUEST_TIMEOUT_S,
                 features_dtype: str = "fp32", log: Callable[[str], None] | None = None) -> None:
        if not urls:
            raise BackendError("--server: give at least one server URL")
        if max_inflight < 1:
            raise BackendError(f"--max-inflight must be >= 1, got {max_inflight}")
        if features_dtype not in FEATURE_DTYPES:
            raise BackendError(f"features dtype must be one of {', '.join(FEATURE_DTYPES)}, got {features_dtype!r}")
        self.say = log or (lambda _m: None)
        self.model_name = model_name
        self.manifest_sha256 = manifest_sha256
        self.feature_dim = int(feature_dim)
        self.retry_window_s = float(retry_window_s)
        self.timeout_s = float(timeout_s)
        self.input_name, self.input_type, self.input_dtype = FEATURE_DTYPES[features_dtype]
        self.servers: list[_Server] = []
        for url in dict.fromkeys(urls):
            protocol, address = parse_server_url(url)
            _tritonclient(protocol)
            self.servers.append(_Server(url, protocol, address, threading.BoundedSemaphore(max_inflight)))
        self._lock = threading.Lock()
        self._next = 0
        self.detail = f"{model_name} on {', '.join(s.url for s in self.servers)}"
        self._pool = ThreadPoolExecutor(max_workers=len(self.servers) * max_inflight,
                                        thread_name_prefix="momkd-remote")
        self._check_servers()

    # -- setup ---------------------------------------------------------------------------------------------------

    def _check_servers(self) -> None:
        """Every server that answers must serve this model (same manifest sha256); at least one must answer."""
        reachable = 0
        for s in self.servers:
            problem = self._check_server(s)
            if problem is None:
                reachable += 1
            else:
                s.down_until = time.monotonic() + DOWN_COOLDOWN_S
                self.say(f"warning: --server {s.url}: {problem}; trying the others (and this one again later)")
        if reachable == 0:
            self.close()
            raise RemoteUnavailableError(f"--server: none of {', '.join(s.url for s in self.servers)} serves "
                                         f"model {self.model_name!r} now (is `momkd serve` running?)")

    def _check_server(self, s: _Server) -> str | None:
        try:
            c = s.client(min(self.timeout_s, 10.0))
            if not c.is_model_ready(self.model_name):
                return f"model {self.model_name!r} is not ready"
            config = c.get_model_config(self.model_name, **({"as_json": True} if s.protocol == "grpc" else {}))
        except Exception as e:  # noqa: BLE001 - an unreachable server is reported, the others may work
            s.forget_client()
            if _is_answer(e):
                return _message(e)
            return f"not reachable ({type(e).__name__}: {_message(e)})"
        config = config.get("config", config)
        served = (config.get("parameters", {}).get(PARAM_MANIFEST_SHA256) or {}).get("string_value")
        if served != self.manifest_sha256:
            self.close()
            raise BackendError(f"--server {s.url}: serves model {self.model_name!r} with manifest sha256 {served}, "
                               f"not this model folder's {self.manifest_sha256}")
        return None

    # -- the pipeline's seam -------------------------------------------------------------------------------------

    def run(self, features: np.ndarray, neighbors: np.ndarray, slide_offsets: np.ndarray) -> dict[str, np.ndarray]:
        raise BackendError("the triton client sends whole slides (features and coords): call run_pack(pack)")

    def run_pack(self, pack: Pack) -> dict[str, np.ndarray]:
        """The pack's slides, one request each, concurrently; the outputs concatenated in pack order.

        Raises ``RemoteSlideError`` when a server rejected a slide (the pipeline then retries the pack's slides
        one by one, so only that slide fails) and ``RemoteUnavailableError`` when no server answers."""
        jobs = []
        for e in pack.entries:
            if e.coords is None:
                raise BackendError("the triton client needs each slide's coords (ReaderConfig.keep_coords)")
            jobs.append(self._pool.submit(self.infer_slide, pack.features[e.offset:e.offset + e.n], e.coords))
        results = [j.result() for j in jobs]
        return {
            PROBABILITY: np.array([r[PROBABILITY] for r in results], dtype=np.float32).reshape(pack.n_slides),
            ATTENTION: np.concatenate([r[ATTENTION] for r in results]).astype(np.float32, copy=False),
            PATCH_SCORE: np.concatenate([r[PATCH_SCORE] for r in results]).astype(np.float32, copy=False),
        }

    def infer_slide(self, features: np.ndarray, coords: np.ndarray) -> dict[str, Any]:
        """One slide (features (n, D), coords (n, 2)) -> {probability: float, attention (n,), patch_score (n,)},
        retried on another server while servers are gone (up to ``retry_window_s``)."""
        deadline = time.monotonic() + self.retry_window_s
        failures: list[str] = []
        avoid: _Server | None = None
        while True:
            server = self._acquire(avoid, deadline, failures)
            try:
                return self._send(server, features, coords)
            except Exception as e:  # noqa: BLE001 - classified below
                if _is_answer(e):
                    raise RemoteSlideError(f"{server.url}: {_message(e)}") from None
                server.forget_client()
                server.down_until = time.monotonic() + DOWN_COOLDOWN_S
                failures.append(f"{server.url}: {type(e).__name__}: {_message(e)[:200]}")
                self.say(f"warning: --server {server.url} failed a request ({type(e).__name__}); retrying elsewhere")
                avoid = server
            finally:
                server.slots.release()

    def _acquire(self, avoid: _Server | None, deadline: float, failures: list[str]) -> _Server:
        """A slot on the next server round-robin that is up (not ``avoid`` while another is up); waits for one."""
        while True:
            now = time.monotonic()
            with self._lock:
                n = len(self.servers)
                order = [self.servers[(self._next + i) % n] for i in range(n)]
                up = [s for s in order if s.down_until <= now]
                preferred = [s for s in up if s is not avoid] or up
                for s in preferred:
                    if s.slots.acquire(blocking=False):
                        self._next = (self.servers.index(s) + 1) % n
                        return s
            if now > deadline:
                last = f" (last: {failures[-1]})" if failures else ""
                raise RemoteUnavailableError(f"--server: no server answered for {self.retry_window_s:.0f} s{last}; "
                                             "the finished rows are kept, rerun with --resume")
            time.sleep(0.005 if up else 0.05)

    def _send(self, server: _Server, features: np.ndarray, coords: np.ndarray) -> dict[str, Any]:
        module = _tritonclient(server.protocol)
        c = server.client(self.timeout_s)
        x = np.ascontiguousarray(features, dtype=self.input_dtype)[None]
        xy = np.ascontiguousarray(coords, dtype=np.int64)[None]
        inputs = [module.InferInput(self.input_name, list(x.shape), self.input_type),
                  module.InferInput(COORDS, list(xy.shape), "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(xy)
        outputs = [module.InferRequestedOutput(name) for name in (PROBABILITY, ATTENTION, PATCH_SCORE)]
        extra = {"client_timeout": self.timeout_s} if server.protocol == "grpc" else {}
        result = c.infer(self.model_name, inputs, outputs=outputs, **extra)
        return {PROBABILITY: float(result.as_numpy(PROBABILITY).reshape(-1)[0]),
                ATTENTION: result.as_numpy(ATTENTION).reshape(-1),
                PATCH_SCORE: result.as_numpy(PATCH_SCORE).reshape(-1)}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def remote_engine(urls: Sequence[str], *, model_name: str = DEFAULT_MODEL_NAME,
                  max_inflight: int = DEFAULT_MAX_INFLIGHT, retry_window_s: float = DEFAULT_RETRY_WINDOW_S,
                  features_dtype: str = "fp32", log: Callable[[str], None] | None = None
                  ) -> Callable[[Manifest], RemoteBackend]:
    """``run_inference(..., engine=remote_engine(urls))``: a :class:`RemoteBackend` for the verified manifest."""

    def build(manifest: Manifest) -> RemoteBackend:
        return RemoteBackend(urls, manifest.sha256, manifest.model.feature_dim, model_name=model_name,
                             max_inflight=max_inflight, retry_window_s=retry_window_s,
                             features_dtype=features_dtype, log=log)

    return build
