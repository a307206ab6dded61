"""`mose serve` put together: the MoSE model for routing, its export, a backend, and the HTTP server."""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mose.export import export_adapters, read_manifest
from mose.models.device import Placement, dtype_str
from mose.models.loading import load_for_inference
from mose.serving.backend import Backend, start_vllm_server
from mose.serving.engine import import_vllm
from mose.serving.router import ChatRouter, RouteBatcher


def run_server(model_spec: str, *, export: Path | None, backend: str | None, where: Placement,
               host: str = "127.0.0.1", port: int = 8000, backend_port: int = 8001,
               backend_timeout: float = 300.0, max_concurrency: int = 32, max_batch: int = 16,
               batch_window_s: float = 0.01, engine_overrides: Mapping[str, Any] | None = None,
               say: Callable[[str], None] = print) -> None:
    """Serve until interrupted; a backend mose started is stopped on the way out."""
    try:
        import uvicorn

        from mose.serving.server import create_app
    except ImportError as error:
        raise ImportError(f"mose serve needs its extra ({error}): pip install 'mose[serve]'") from None
    if backend is None:
        import_vllm()  # the backend mose starts is vLLM's server
    model, processor = load_for_inference(model_spec, where)
    router = ChatRouter(model, processor)  # refuses a model that is not MoSE
    with ExitStack() as stack:
        if backend is None:
            folder = export if export is not None else _export_all(model, processor, stack, say)
            read_manifest(folder)  # a clear error for a folder that is no export
            say(f"starting vLLM on 127.0.0.1:{backend_port} with the adapters of {folder} (log: "
                f"{folder / 'vllm-server.log'}) ...")
            process = start_vllm_server(folder, backend_port, dtype_str(where.dtype), engine_overrides,
                                        log=folder / "vllm-server.log")
            stack.callback(_stop, process)
            backend = f"http://127.0.0.1:{backend_port}"
        batcher = RouteBatcher(router, max_batch=max_batch, window_s=batch_window_s)
        app = create_app(batcher, Backend(backend, backend_timeout), processor_tokenizer(processor),
                         max_concurrency)
        say(f"mose serve: http://{host}:{port}/v1/chat/completions → {backend}")
        # uvicorn re-raises the SIGTERM that stopped it after its own shutdown; with the default
        # action the process would die there and leave the backend it started running.
        signal.signal(signal.SIGTERM, _exit)
        uvicorn.run(app, host=host, port=port, log_level="warning")


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: the backend mose started stops


def processor_tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _export_all(model: Any, processor: Any, stack: ExitStack, say: Callable[[str], None]) -> Path:
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mose-serve-"))) / "export"
    say(f"exporting every chain's adapter to {folder} (pass --export to reuse a `mose export` folder)")
    export_adapters(model, folder, processor=processor, progress=True)
    return folder


def _stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except Exception:
        process.kill()
