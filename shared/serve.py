"""`onnxfn serve NAME`: run one function under gunicorn on `$PORT` (the container's command).

The master imports the heavy libraries once before forking (a faster cold start); each worker then
builds its own onnxruntime session after the fork (never `preload_app`: CUDA state must be created
per process), loads and warms the model in the background, and reports ready on
`/health/readiness` only after that. SIGTERM: stop accepting, finish what is in flight, exit
within the graceful timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.readiness import WorkerReadiness


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("function", nargs="?", help="function name (default: $ONNXFN_FUNCTION)")


def run(args: argparse.Namespace) -> int:
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
    """What each worker serves: handler, metrics, pipeline (loading in the background) and WSGI app."""
    from shared.app import create_app
    from shared.contract import load_handler
    from shared.metrics import Metrics
    from shared.pipeline import Pipeline

    handler = load_handler(settings.function)
    pipeline = Pipeline(handler, settings, Metrics(handler.config.name))
    pipeline.start(background=True)
    return create_app(pipeline, settings.max_body_bytes)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings for this function (layout from the function's config, overridable)."""
    from shared.contract import load_handler
    from shared.pipeline import Layout

    layout = Layout.of(load_handler(settings.function).config, settings)
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": layout.workers,
        "worker_class": "gthread",
        "threads": layout.threads,
        "graceful_timeout": settings.graceful_timeout_s,
        "timeout": 60,
        "keepalive": 75,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level,
        "proc_name": f"onnxfn-{settings.function}",
        "preload_app": False,
    }


def serve(settings: Settings) -> None:
    """Run gunicorn in this process until it is told to stop."""
    metrics_dir, made_metrics_dir = prepare_metrics_dir()
    state_dir = Path(tempfile.mkdtemp(prefix="onnxfn-state-"))
    settings = dataclasses.replace(settings, state_dir=state_dir)
    # Heavy imports in the master: workers inherit them on fork instead of importing each.
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    from gunicorn.app.base import BaseApplication
    from prometheus_client import multiprocess

    import shared.app  # noqa: F401

    level = getattr(logging, settings.log_level.upper(), logging.INFO)

    def post_fork(server: Any, worker: Any) -> None:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")

    def child_exit(server: Any, worker: Any) -> None:
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
        WorkerReadiness.forget(state_dir, worker.pid)

    def on_exit(server: Any) -> None:
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
