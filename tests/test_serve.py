"""``momkd serve`` and ``momkd infer --server`` against real Triton servers on 127.0.0.1 (the tritonserver bundled
with nvidia-pytriton): start/stop, health and readiness, parity with local inference, every bad-request class,
16 concurrent clients, a server killed mid-run, a server restarted under --resume.

Two servers per module (module-scoped fixture); every wait is bounded.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.manifest import Manifest, load_manifest
from momkd.runtime.pipeline import run_inference
from momkd.runtime.remote import RemoteBackend, RemoteSlideError, RemoteUnavailableError, remote_engine
from momkd.runtime.results import PREDICTIONS, ResultRow, read_predictions
from momkd.serve.repository import ServedModel
from momkd.serve.server import Ports, TritonServer, free_ports
from momkd.testing.toy import build_toy_model_dir, write_slide_folder

pytestmark = pytest.mark.server

D = 8
SIZES = [int(n) for n in np.random.default_rng(7).integers(20, 160, size=24)]


def start_server(manifest: Manifest, ports: Ports | None = None) -> TritonServer:
    server = TritonServer(manifest, ServedModel(max_rows=1000, max_queue_delay_us=500, threads=1),
                          ports or Ports.free(), address="127.0.0.1")
    server.start()
    try:
        server.wait_ready(timeout_s=90)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("serve") / "model"
    build_toy_model_dir(root, feature_dim=D, hidden=4)
    return load_manifest(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve_slides") / "slides"
    write_slide_folder(path, SIZES, D, seed=3)
    return path


@pytest.fixture(scope="module")
def servers(model: Manifest):
    started: list[TritonServer] = []
    try:
        for _ in range(2):
            started.append(start_server(model))
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def local_rows(model: Manifest, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ResultRow]:
    out = tmp_path_factory.mktemp("serve_local") / "out"
    summary = run_inference(model.root, folder, out, backend="onnxruntime", device="cpu", batch_patches=1000)
    assert summary.n_ok == len(SIZES)
    return {r.slide_id: r for r in read_predictions(out / PREDICTIONS)}


def assert_same_predictions(rows: list[ResultRow], local: dict[str, ResultRow]) -> None:
    """One ok row per slide, in file order, with local inference's probability (<= 1e-6) and prediction."""
    assert [r.slide_id for r in rows] == sorted(local)
    for r in rows:
        ref = local[r.slide_id]
        assert r.status == "ok", r
        assert (r.file, r.n_patches, r.prediction) == (ref.file, ref.n_patches, ref.prediction)
        assert abs(float(r.probability) - float(ref.probability)) <= 1e-6


def ensure_running(servers: list[TritonServer], i: int, model: Manifest) -> TritonServer:
    """Server ``i`` ready (restarted on its own ports if an earlier test stopped it)."""
    if servers[i].process is None or servers[i].process.poll() is not None:
        servers[i].stop()
        servers[i] = start_server(model, servers[i].ports)
    return servers[i]


def slide_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int64) * 256
    return rng.standard_normal((n, D)).astype(np.float32), coords


# --------------------------------------------------------------------------- start, health, readiness


def test_server_starts_and_reports_health(servers: list[TritonServer], model: Manifest) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    s = servers[0]
    assert s.startup_s is not None and s.startup_s < 90
    print(f"tritonserver ready in {s.startup_s:.2f} s")
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/momkd/ready"):
        with urllib.request.urlopen(s.http_url + path, timeout=5) as r:
            assert r.status == 200, path
    g = grpcclient.InferenceServerClient(s.grpc_url.removeprefix("grpc://"))
    assert g.is_server_ready() and g.is_model_ready("momkd")
    config = httpclient.InferenceServerClient(s.http_url.removeprefix("http://")).get_model_config("momkd")
    assert config["parameters"]["manifest_sha256"]["string_value"] == model.sha256
    with urllib.request.urlopen(f"http://127.0.0.1:{s.ports.metrics}/metrics", timeout=5) as r:
        assert b"nv_inference_request_success" in r.read()


@pytest.mark.slow   # starts and stops its own server (~6-10 s)
def test_stop_ends_the_server_and_its_stub(model: Manifest) -> None:
    s = start_server(model)
    pid = s.process.pid
    s.stop()
    assert s.process.poll() is not None and not s.ready()
    with pytest.raises(ProcessLookupError):
        import os

        os.killpg(pid, 0)   # no stub left in the server's process group


@pytest.mark.slow   # starts and stops its own server (~6-10 s)
def test_momkd_serve_command_serves_until_sigterm(model: Manifest, folder: Path, local_rows: dict[str, ResultRow],
                                                 tmp_path: Path) -> None:
    """The two shells of the README: `momkd serve MODEL` in one, `momkd infer ... --server URL` in the other."""
    import os
    import signal
    import subprocess
    import sys

    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-c", "from momkd.cli.main import app; app(prog_name='momkd')", "serve", str(model.root),
           "--address", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
           str(metrics), "--max-rows", "2000", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/momkd/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate(timeout=10)
        out = tmp_path / "remote"
        result = CliRunner().invoke(app, ["infer", str(model.root), str(folder), "--out", str(out), "-q",
                                          "--server", f"http://127.0.0.1:{http}"])
        assert result.exit_code == 0, result.output
        assert_same_predictions(read_predictions(out / PREDICTIONS), local_rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "ready in" in stderr and "stopping the server" in stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=2)


def test_momkd_serve_checks_the_manifest_before_serving(model: Manifest) -> None:
    result = CliRunner().invoke(app, ["serve", str(model.root), "--model-sha256", "0" * 64])
    assert result.exit_code == 2 and "differs from the pinned" in result.output


# --------------------------------------------------------------------------- parity


def test_infer_server_writes_the_local_predictions(servers: list[TritonServer], model: Manifest, folder: Path,
                                                   local_rows: dict[str, ResultRow], tmp_path: Path) -> None:
    ensure_running(servers, 0, model)
    ensure_running(servers, 1, model)
    out = tmp_path / "remote"
    result = CliRunner().invoke(app, ["infer", str(model.root), str(folder), "--out", str(out), "-q",
                                      "--batch-patches", "400", "--server", servers[0].http_url,
                                      "--server", servers[1].grpc_url])
    assert result.exit_code == 0, result.output
    assert f"{len(SIZES)} ok, 0 failed" in result.output
    assert_same_predictions(read_predictions(out / PREDICTIONS), local_rows)


def test_server_outputs_match_the_local_backend(servers: list[TritonServer], model: Manifest) -> None:
    from momkd.data.batch import graph_slide, pack_slides
    from momkd.runtime.backends import select_backend

    s = ensure_running(servers, 0, model)
    features, coords = slide_arrays(300, seed=1)
    pack = pack_slides([graph_slide("s", features, coords, model.model.k, model.model.graph_direction)])
    be = select_backend("onnxruntime", "cpu", model)
    ref = be.run(pack.features, pack.neighbors, pack.slide_offsets)
    remote = RemoteBackend([s.grpc_url], model.sha256, D)
    try:
        got = remote.infer_slide(features, coords)
    finally:
        remote.close()
    assert abs(got["probability"] - float(ref["probability"][0])) <= 1e-6
    np.testing.assert_allclose(got["attention"], ref["attention"], atol=1e-6)
    np.testing.assert_allclose(got["patch_score"], ref["patch_score"], atol=1e-6)


def test_client_refuses_a_server_with_another_model(servers: list[TritonServer], model: Manifest) -> None:
    from momkd.errors import MomkdError

    s = ensure_running(servers, 0, model)
    with pytest.raises(MomkdError, match="manifest sha256"):
        RemoteBackend([s.http_url], "0" * 64, D)


# --------------------------------------------------------------------------- bad requests


def _infer_raw(url: str, inputs: dict[str, tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
    """One request of ``inputs`` (name: (array with the batch dimension, Triton dtype)); its outputs' row 0."""
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url.removeprefix("http://"))
    tensors = []
    for name, (array, dtype) in inputs.items():
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    r = c.infer("momkd", tensors)
    return {n: r.as_numpy(n)[0] for n in ("probability", "prediction", "attention", "patch_score")}


def test_bad_requests_get_an_error_naming_the_problem(servers: list[TritonServer], model: Manifest) -> None:
    from tritonclient.utils import InferenceServerException

    s = ensure_running(servers, 0, model)
    features, coords = slide_arrays(40)
    nan = features.copy()
    nan[3, 1] = np.nan
    f, c = features[None], coords[None]                  # one slide: batch dimension 1
    cases = {
        "wrong D": ({"features": (np.zeros((1, 40, D + 1), np.float32), "FP32"), "coords": (c, "INT64")},
                    r"'features'.*\[-1,-1,8\]"),
        "NaN": ({"features": (nan[None], "FP32"), "coords": (c, "INT64")}, "NaN or Inf in 1 of 40 rows"),
        "N = 0": ({"features": (f[:, :0], "FP32"), "coords": (c[:, :0], "INT64")}, "N = 0"),
        "wrong dtype": ({"features": (f.astype(np.float64), "FP64"), "coords": (c, "INT64")},
                        "'features' data-type is 'FP64', but model 'momkd' expects 'FP32'"),
        "mismatched N": ({"features": (f, "FP32"), "coords": (c[:, :39], "INT64")}, "N must match"),
        "no features": ({"coords": (c, "INT64")}, "exactly one of"),
        "two slides in one request": ({"features": (np.concatenate([f, f]), "FP32"),
                                       "coords": (np.concatenate([c, c]), "INT64")}, "one slide per request"),
        "duplicate coords": ({"features": (f, "FP32"), "coords": (np.zeros_like(c), "INT64")}, "coords repeat"),
    }
    for label, (inputs, message) in cases.items():
        with pytest.raises(InferenceServerException, match=message):
            _infer_raw(s.http_url, inputs)
        assert s.process.poll() is None, f"the server died on the {label} request"
    good = _infer_raw(s.http_url, {"features": (f, "FP32"), "coords": (c, "INT64")})
    half = _infer_raw(s.http_url, {"features_fp16": (f.astype(np.float16), "FP16"), "coords": (c, "INT64")})
    assert good["attention"].shape == (40,) and good["prediction"][0] in (0, 1)
    assert abs(float(half["probability"][0]) - float(good["probability"][0])) < 1e-2


def test_a_rejected_slide_is_its_row_not_the_run(servers: list[TritonServer], model: Manifest) -> None:
    s = ensure_running(servers, 0, model)
    features, coords = slide_arrays(30)
    remote = RemoteBackend([s.http_url], model.sha256, D)
    try:
        with pytest.raises(RemoteSlideError, match="N must match"):
            remote.infer_slide(features, coords[:29])
        assert remote.infer_slide(features, coords)["attention"].shape == (30,)
    finally:
        remote.close()


# --------------------------------------------------------------------------- load


def test_sixteen_concurrent_clients(servers: list[TritonServer], model: Manifest) -> None:
    s = ensure_running(servers, 0, model)
    slides = [slide_arrays(20 + 7 * i, seed=i) for i in range(20)]
    reference = RemoteBackend([s.http_url], model.sha256, D)
    try:
        expected = [reference.infer_slide(f, c)["probability"] for f, c in slides]
    finally:
        reference.close()

    def client(k: int) -> list[float]:
        url = s.http_url if k % 2 else s.grpc_url
        remote = RemoteBackend([url], model.sha256, D, max_inflight=1)
        try:
            return [remote.infer_slide(f, c)["probability"] for f, c in slides]
        finally:
            remote.close()

    before = model_stats(s)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    after = model_stats(s)
    assert len(results) == 16
    for got in results:
        assert len(got) == 20
        np.testing.assert_allclose(got, expected, atol=1e-6)
    requests = after["inference_count"] - before["inference_count"]
    assert requests == 16 * 20
    assert after["execution_count"] - before["execution_count"] < requests   # the dynamic batcher packed them


def model_stats(server: TritonServer) -> dict[str, int]:
    import tritonclient.http as httpclient

    stats = httpclient.InferenceServerClient(server.http_url.removeprefix("http://")).get_inference_statistics("momkd")
    return {k: int(stats["model_stats"][0][k]) for k in ("inference_count", "execution_count")}


# --------------------------------------------------------------------------- faults

def kill_after(server: TritonServer, slides: int) -> tuple[threading.Event, Callable[[int, int, int, int], None]]:
    """A ``run_inference`` progress callback that kills ``server`` (as a crash would) once ``slides`` are done,
    and the event it sets when it has."""
    killed = threading.Event()

    def progress(done: int, total: int, ok: int, failed: int) -> None:
        if done >= slides and not killed.is_set():
            killed.set()
            server.kill()

    return killed, progress



def test_a_server_killed_mid_run_loses_no_slide(servers: list[TritonServer], model: Manifest, folder: Path,
                                                local_rows: dict[str, ResultRow], tmp_path: Path) -> None:
    a, b = ensure_running(servers, 0, model), ensure_running(servers, 1, model)
    notes: list[str] = []
    killed, progress = kill_after(b, 4)

    out = tmp_path / "out"
    summary = run_inference(model.root, folder, out, batch_patches=400, progress=progress, log=notes.append,
                            engine=remote_engine([a.http_url, b.http_url], max_inflight=2, retry_window_s=20,
                                                 log=notes.append))
    assert killed.is_set() and b.process.poll() is not None
    assert any("failed a request" in n for n in notes), notes
    assert summary.n_ok == len(SIZES) and summary.n_failed == 0
    assert_same_predictions(read_predictions(out / PREDICTIONS), local_rows)


@pytest.mark.slow   # starts and stops its own server (~6-10 s)
def test_a_restarted_server_finishes_the_run_under_resume(servers: list[TritonServer], model: Manifest,
                                                          folder: Path, local_rows: dict[str, ResultRow],
                                                          tmp_path: Path) -> None:
    s = ensure_running(servers, 1, model)
    killed, progress = kill_after(s, 6)

    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailableError, match="--resume"):
        run_inference(model.root, folder, out, batch_patches=400, progress=progress,
                      engine=remote_engine([s.grpc_url], retry_window_s=2))
    assert time.monotonic() - t0 < 60
    partial = read_predictions(out / PREDICTIONS)
    assert 6 <= len([r for r in partial if r.status == "ok"]) < len(SIZES)
    assert all(r.status == "ok" for r in partial)         # no slide recorded as failed: the run stopped instead

    restarted = ensure_running(servers, 1, model)
    summary = run_inference(model.root, folder, out, batch_patches=400, resume=True,
                            engine=remote_engine([restarted.grpc_url]))
    assert summary.n_kept == len(partial) and summary.n_ok == len(SIZES) and summary.n_failed == 0
    assert_same_predictions(read_predictions(out / PREDICTIONS), local_rows)


# --------------------------------------------------------------------------- client usage errors (no server)


@pytest.mark.parametrize("url,message", [("ftp://h:1", "http:// or grpc://"), ("http://host", "HOST:PORT"),
                                         ("http://h:1/v2", "HOST:PORT")])
def test_bad_server_urls_are_usage_errors(url: str, message: str) -> None:
    from momkd.runtime.remote import parse_server_url

    from momkd.errors import MomkdError

    with pytest.raises(MomkdError, match=message):
        parse_server_url(url)


def test_no_server_answering_is_a_usage_error(model: Manifest, folder: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    result = CliRunner().invoke(app, ["infer", str(model.root), str(folder), "--out", str(tmp_path / "o"), "-q",
                                      "--server", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2 and "none of" in result.output and "momkd serve" in result.output
    result = CliRunner().invoke(app, ["infer", str(model.root), str(folder), "--out", str(tmp_path / "o"),
                                      "--backend", "onnxruntime", "--server", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2 and "with --server the servers run the model" in result.output
