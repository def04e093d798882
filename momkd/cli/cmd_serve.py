"""``momkd serve MODEL_DIR``: serve one model folder on Triton Inference Server (HTTP, gRPC, metrics) until
Ctrl-C or SIGTERM (needs momkd[serve])."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Optional

import typer
from rich.console import Console

from momkd.cli.choices import BackendName
from momkd.cli.errors import handle_errors

console = Console(stderr=True)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@handle_errors(missing="momkd serve needs the Triton server and client (pip install 'momkd[serve]')")
def serve(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `momkd export` (manifest.json, model.onnx, ...).")],
    http_port: Annotated[int, typer.Option("--http-port", help="Triton's HTTP/REST port (KServe v2 protocol).", min=1, max=65535)] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="Triton's gRPC port.", min=1, max=65535)] = 8001,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port (/metrics).", min=1, max=65535)] = 8002,
    address: Annotated[str, typer.Option("--address", help="Address the three endpoints listen on (127.0.0.1: this machine only).")] = "0.0.0.0",
    max_rows: Annotated[int, typer.Option("--max-rows", help="Row budget of one model call: the requests waiting are packed up to it (a larger slide runs alone).", min=1)] = 32_768,
    model_name: Annotated[str, typer.Option("--model-name", help="The Triton model name clients ask for.")] = "momkd",
    instances: Annotated[int, typer.Option("--instances", help="Model instances (each runs packs on its own).", min=1)] = 1,
    max_queue_delay_us: Annotated[int, typer.Option("--max-queue-delay-us", help="How long the dynamic batcher waits for more requests to fill a pack (microseconds).", min=0)] = 2000,
    backend: Annotated[BackendName, typer.Option(help="The engine inside the model, as for `momkd infer`.")] = "auto",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: the best available).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads of each instance's engine (default: all cores).", min=1)] = None,
    model_sha256: Annotated[Optional[str], typer.Option("--model-sha256", envvar="MOMKD_MODEL_SHA256", help="Refuse the model unless its manifest.json has this sha256: 64 hex digits, @FILE or a .sha256 file kept outside the model folder.")] = None,
) -> None:
    """Serve MODEL_DIR on Triton Inference Server until Ctrl-C; clients: `momkd infer MODEL_DIR FOLDER --server URL`."""
    from momkd.manifest import load_manifest, resolve_pin
    from momkd.serve.repository import ServedModel
    from momkd.serve.server import Ports, TritonServer

    pinned = resolve_pin(model_sha256) if model_sha256 else None
    manifest = load_manifest(model_dir, verify_checksums=True, pinned_sha256=pinned)   # before anything is served
    served = ServedModel(name=model_name, max_rows=max_rows, instances=instances,
                         max_queue_delay_us=max_queue_delay_us, backend=backend, device=device, threads=threads)
    server = TritonServer(manifest, served, Ports(http_port, grpc_port, metrics_port), address=address)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        startup_s = server.wait_ready()
        console.print(f"serving {model_dir} as {model_name!r} (manifest sha256 {manifest.sha256[:12]}…) at "
                      f"{server.http_url} and {server.grpc_url}, metrics on :{metrics_port}/metrics; ready in "
                      f"{startup_s:.1f} s; Ctrl-C stops", highlight=False, markup=False, soft_wrap=True)
        code = server.process.wait() if server.process is not None else 0
        from momkd.serve.server import ServeError

        raise ServeError(f"tritonserver exited with code {code}: {server.log_errors()}")
    except KeyboardInterrupt:
        console.print("stopping the server", highlight=False, markup=False)
    finally:
        server.stop()
