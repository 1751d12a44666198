"""`onnxfn serve NAME`: run one function under gunicorn on `$PORT` (the container's command).

Each worker is an asyncio (uvicorn, httptools, uvloop) worker serving the ASGI app in
`shared.app`. The master imports the web stack once before forking (a faster cold start) but
never onnxruntime: its thread pools do not survive a fork (workers aborted at exit with
`std::system_error` when it did), so each worker imports it and builds its own session after the
fork, loads and warms the model in the background, and reports ready on `/health/readiness` only
after that. SIGTERM: stop accepting, finish what is in flight, exit 0 within the graceful timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn import Server
from uvicorn_worker import UvicornWorker

from shared.config import Settings
from shared.http_protocol import BoundedHttpToolsProtocol

if TYPE_CHECKING:
    from shared.engine import EngineSupervisor
from shared.readiness import WorkerReadiness


class FunctionWorker(UvicornWorker):  # type: ignore[misc]
    """gunicorn worker running the function's ASGI app on uvloop with the httptools parser
    (its request heads capped: shared/http_protocol.py)."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": BoundedHttpToolsProtocol,
        "lifespan": "on",
        "ws": "none",
        "server_header": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # In-flight requests get the graceful timeout (less a margin for the exit itself).
        self.config.timeout_graceful_shutdown = max(1, self.cfg.graceful_timeout - 1)
        self.stopping = False  # a stop came before uvicorn took over the signals
        self.server: Server | None = None
        self.arbiter_signals: Any = None  # the master's signal queue, as forked (set in post_fork)

    def init_signals(self) -> None:
        """Until uvicorn installs its own handlers (while serving), SIGTERM/SIGINT are remembered:
        a stop during the model load then ends the worker as soon as it serves, where gunicorn's
        master would otherwise wait its whole graceful timeout for a worker that swallowed it.
        After the drain uvicorn raises the signal again; the same handler lets the worker exit 0."""
        super().init_signals()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_requested)
        # Between fork and here the master's own handler was in place: it queued the signal in
        # this process's copy of the master's queue instead of stopping the worker.
        while self.arbiter_signals is not None and not self.arbiter_signals.empty():
            queued = self.arbiter_signals.get_nowait()
            if queued in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._stop_requested(queued, None)

    def _stop_requested(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.should_exit = True

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        self.server = Server(config=self.config)
        if self.stopping:
            self.server.should_exit = True  # start, then drain at once: nothing is in flight yet
        self._install_sigquit_handler()
        # With reuse_port the master binds nothing (its "Listening at:" line is empty): say it here.
        self.log.info("Listening at: %s (worker %s, SO_REUSEPORT)", ",".join(map(str, self.sockets)), self.pid)
        await self.server.serve(sockets=self.sockets)
        if not self.server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "function",
        nargs="?",
        help="a function folder's name (digits), or the dotted module of your own (mypkg.myfunc) "
        "whose new() returns its handler (default: $ONNXFN_FUNCTION)",
    )
    parser.add_argument("--model", type=Path, help="serve this ONNX file with the generic tensor-in/out function")
    parser.add_argument("--name", help="with --model: the function's name (default: the file's stem)")


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        if args.function:
            raise SystemExit("onnxfn serve: give a function or --model, not both")
        if not args.model.is_file():
            raise SystemExit(f"onnxfn serve: no model file {args.model}")
        model = args.model.resolve()
        os.environ.update({"ONNXFN_MODEL_FILE": str(model), "ONNXFN_MODEL_DIR": str(model.parent)})
        if args.name:
            os.environ["ONNXFN_FUNCTION_NAME"] = args.name
        args.function = "shared.generic"
    settings = Settings.from_env(function=args.function)
    serve(settings)
    return 0


def prepare_metrics_dir() -> tuple[str, bool]:
    """Point prometheus_client's multiprocess mode at an empty folder (before it is imported).
    Returns the folder and whether this process made it (then it removes it on exit)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    created = not directory
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        directory = tempfile.mkdtemp(prefix="onnxfn-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.makedirs(directory, exist_ok=True)
    return directory, created


def build_app(settings: Settings) -> Any:
    """What each worker serves: handler, metrics, pipeline and the ASGI app."""
    from shared import tracing
    from shared.app import create_app
    from shared.contract import load_handler
    from shared.metrics import Metrics
    from shared.pipeline import Pipeline
    from shared.process import process_started_at

    handler = load_handler(settings.function)
    tracing.configure(handler.config.name)
    pipeline = Pipeline(handler, settings, Metrics(handler.config.name))  # the app's lifespan starts it
    pipeline.server_started_at = process_started_at(os.getppid())  # the gunicorn master: the pod's server
    return create_app(pipeline, settings.max_body_bytes)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings for this function (layout from the function's config, overridable)."""
    from shared.contract import load_handler
    from shared.pipeline import Layout

    layout = Layout.of(load_handler(settings.function).config, settings)
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": layout.workers,
        "worker_class": FunctionWorker,
        "graceful_timeout": settings.graceful_timeout_s,
        "timeout": 60,
        "keepalive": 75,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level,
        "proc_name": f"onnxfn-{settings.function}",
        "preload_app": False,
        # Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections over
        # the workers: with one shared socket an asyncio worker can accept most keep-alive
        # connections and leave the others idle.
        "reuse_port": True,
        # gunicorn >= 23 opens a control socket under $HOME, which is not writable in the image.
        "control_socket_disable": True,
    }


def start_engine(settings: Settings) -> EngineSupervisor | None:
    """The shared engine process, when this function's layout has one (before any worker starts)."""
    from shared.contract import load_handler
    from shared.engine import EngineSupervisor
    from shared.pipeline import Layout

    if not Layout.of(load_handler(settings.function).config, settings).engine:
        return None
    assert settings.state_dir is not None
    env = {**os.environ, "ONNXFN_FUNCTION": settings.function}
    supervisor = EngineSupervisor(settings.state_dir / "engine.sock", env)
    supervisor.start()
    return supervisor


def serve(settings: Settings) -> None:
    """Run gunicorn in this process until it is told to stop."""
    metrics_dir, made_metrics_dir = prepare_metrics_dir()
    state_dir = Path(tempfile.mkdtemp(prefix="onnxfn-state-"))
    settings = dataclasses.replace(settings, state_dir=state_dir)
    engine = start_engine(settings)
    if engine is not None:
        settings = dataclasses.replace(settings, engine_socket=engine.socket_path)
    # Heavy imports in the master (not onnxruntime): workers inherit them on fork.
    import numpy  # noqa: F401
    from gunicorn.app.base import BaseApplication
    from prometheus_client import multiprocess

    import shared.app  # noqa: F401

    level = getattr(logging, settings.log_level.upper(), logging.INFO)

    def post_fork(server: Any, worker: Any) -> None:
        worker.arbiter_signals = server.SIG_QUEUE
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")

    def child_exit(server: Any, worker: Any) -> None:
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
        WorkerReadiness.forget(state_dir, worker.pid)

    def on_exit(server: Any) -> None:
        if engine is not None:  # after the last worker drained: the engine served it to the end
            engine.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    class FunctionServer(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in {
                **gunicorn_options(settings),
                "post_fork": post_fork,
                "child_exit": child_exit,
                "on_exit": on_exit,
            }.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return build_app(settings)

    FunctionServer().run()
