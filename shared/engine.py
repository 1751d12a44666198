"""The inference engine: one process per device owns the onnxruntime session and the batcher.

With the shared engine (`ONNXFN_ENGINE=shared`, the default on a GPU), HTTP workers parse,
validate and encode; they send each item's tensors over a Unix socket to the engine process
(`python -m shared.engine`), whose batcher gathers the items of every worker into one run. So
batches form across all connections, one CUDA context serves the GPU, and the HTTP front scales
with the host's cores. The engine listens only once its model is loaded and warmed, and greets
each worker with the model's tensor specs. A full queue answers 429; an engine that dies fails
the items in flight as 503 (retryable), takes every worker out of readiness, and is restarted by
`EngineSupervisor` in the gunicorn master, which also stops it after the last worker drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from shared import tensor_frames as frames
from shared.config import Settings
from shared.errors import FunctionError, InferenceFailed, ModelNotReady, QueueFull
from shared.model import TensorSpec, check_feeds
from shared.supervisor import ChildProcess

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype.str, "shape": list(spec.shape), "onnx_type": spec.onnx_type}


def _spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(raw["name"], np.dtype(raw["dtype"]), tuple(raw["shape"]), raw["onnx_type"])


_ERRORS: dict[int, type[FunctionError]] = {429: QueueFull, 503: ModelNotReady}


# -- the engine process ------------------------------------------------------------------------------
class EngineServer:
    """Serves one model to every worker of a function server."""

    def __init__(self, settings: Settings) -> None:
        from shared.batcher import DynamicBatcher
        from shared.contract import bind_model, load_handler, setup_handler
        from shared.metrics import Metrics
        from shared.model import OnnxModel
        from shared.pipeline import Layout

        handler = load_handler(settings.function)
        config = handler.config
        layout = Layout.of(config, settings)
        setup_handler(handler, settings.model_dir)
        model_file = config.model_file_for(settings.model_version or config.model_version)
        if model_file is None:
            raise ValueError(f"function {config.name} has no model: it needs no engine")
        started = time.perf_counter()
        self.model = OnnxModel(
            settings.model_dir / model_file,
            providers=settings.providers,
            intra_op_threads=layout.intra_op_threads,
            spinning=bool(settings.intra_op_spinning),
            cache_dir=settings.cache_dir,
        )
        bind_model(handler, self.model)
        loaded = time.perf_counter()
        self.model.run(handler.preprocess(handler.example()))
        self.hello = orjson.dumps(
            {
                "inputs": [_spec_json(s) for s in self.model.inputs],
                "outputs": [_spec_json(s) for s in self.model.outputs],
                "providers": self.model.providers,
                "on_gpu": self.model.on_gpu,
                "model_load_s": loaded - started,
                "warmup_s": time.perf_counter() - loaded,
                "pid": os.getpid(),
            }
        )
        self.metrics = Metrics(config.name)
        self.batcher = DynamicBatcher(
            self.model.run,
            max_batch_size=layout.max_batch_size,
            capacity=layout.queue_capacity,
            inline=False,
            threads=layout.inference_threads,
            observe=self.metrics.observe_batch,
            observe_sources=self.metrics.engine_batch_workers.observe,
        )
        self._connections = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        log.info(
            "engine for %s ready: load %.3f s, providers %s, pid %d",
            config.name,
            loaded - started,
            self.model.providers,
            os.getpid(),
        )

    async def serve(self, socket_path: Path) -> None:
        """Listen on `socket_path` until SIGTERM; then finish what is in flight."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, stopping.set)
        partial = socket_path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._connection, path=str(partial))
        os.replace(partial, socket_path)  # appears whole, and only once the model is ready
        await stopping.wait()
        server.close()
        socket_path.unlink(missing_ok=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        for writer in list(self._writers):
            writer.close()
        self.batcher.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frames.LENGTH.pack(len(self.hello)) + self.hello)
        self._writers.add(writer)
        self._connections += 1
        source = self._connections
        try:
            while True:
                header = await reader.readexactly(frames.LENGTH.size)
                body = await reader.readexactly(frames.LENGTH.unpack(header)[0])
                self._submit(body, writer, source)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the worker went away (its items in flight go with it), or the engine is stopping
        finally:
            self._writers.discard(writer)
            writer.close()

    def _submit(self, body: bytes, writer: asyncio.StreamWriter, source: int) -> None:
        try:
            request_id, admitted, feeds = frames.decode_request(body)
        except frames.FrameError as exc:
            log.error("dropping a worker's connection: %s", exc)
            writer.close()
            return
        try:
            future = self.batcher.submit(feeds, admitted=admitted, source=source)
        except FunctionError as exc:
            writer.write(frames.encode_error(request_id, exc.status, exc.message))
            return
        self._tasks.add(future)
        future.add_done_callback(lambda done: self._reply(request_id, done, writer))

    def _reply(self, request_id: int, done: asyncio.Future[Feeds], writer: asyncio.StreamWriter) -> None:
        self._tasks.discard(done)
        if writer.is_closing():
            return
        error = done.exception()
        if error is None:
            writer.write(frames.encode_reply(request_id, done.result()))
        else:
            status = error.status if isinstance(error, FunctionError) else 500
            writer.write(frames.encode_error(request_id, status, str(error)))


def main() -> int:
    settings = Settings.from_env()
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    socket_path = Path(os.environ["ONNXFN_ENGINE_SOCKET"])
    import uvloop

    failure = failure_file(socket_path)
    try:
        server = EngineServer(settings)
    except Exception as exc:  # the workers' readiness says why (they cannot connect to say it)
        log.error("the engine could not load %s: %s", settings.function, exc)
        failure.write_text(f"{type(exc).__name__}: {exc}")
        return 1
    failure.unlink(missing_ok=True)
    uvloop.run(server.serve(socket_path))
    return 0


def failure_file(socket_path: Path) -> Path:
    """Where an engine that could not load its model leaves the reason for the workers."""
    return socket_path.with_suffix(".failed")


# -- the worker side ---------------------------------------------------------------------------------
class EngineClient:
    """A worker's link to the engine: the model's specs, and `submit()` as the batcher has it."""

    inline = False

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any]) -> None:
        self._reader, self._writer = reader, writer
        self.inputs = [_spec(s) for s in hello["inputs"]]
        self.outputs = [_spec(s) for s in hello["outputs"]]
        self.providers: list[str] = hello["providers"]
        self.on_gpu: bool = hello["on_gpu"]
        self.hello = hello
        self._pending: dict[int, asyncio.Future[Feeds]] = {}
        self._next_id = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reading = asyncio.ensure_future(self._read_replies())

    @classmethod
    async def connect(cls, socket_path: Path) -> EngineClient:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=1 << 26)
        header = await reader.readexactly(frames.LENGTH.size)
        hello = orjson.loads(await reader.readexactly(frames.LENGTH.unpack(header)[0]))
        return cls(reader, writer, hello)

    def check_feeds(self, feeds: Feeds) -> list[str]:
        return check_feeds(self.inputs, feeds)

    def submit(self, feeds: Feeds, *, admitted: bool = False) -> asyncio.Future[Feeds]:
        if self.closed.done():
            raise ModelNotReady("the inference engine is restarting; retry shortly")
        self._next_id += 1
        future: asyncio.Future[Feeds] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        self._writer.write(frames.encode_request(self._next_id, feeds, admitted))
        return future

    async def _read_replies(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(frames.LENGTH.size)
                body = await self._reader.readexactly(frames.LENGTH.unpack(header)[0])
                request_id, status, outcome = frames.decode_reply(body)
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if status == 0:
                    future.set_result(outcome)
                else:
                    future.set_exception(_ERRORS.get(status, InferenceFailed)(outcome))
        except (asyncio.IncompleteReadError, ConnectionError, frames.FrameError) as exc:
            log.warning(
                "lost the inference engine (%s): %d item(s) in flight fail as 503",
                type(exc).__name__,
                len(self._pending),
            )
        finally:
            self._writer.close()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ModelNotReady("the inference engine stopped; retry shortly"))
            self._pending.clear()
            if not self.closed.done():
                self.closed.set_result(None)

    def close(self) -> None:
        self._reading.cancel()


# -- the supervisor (in the gunicorn master) --------------------------------------------------------------


class EngineSupervisor:
    """Starts the engine process, restarts it when it dies, and stops it at the end."""

    def __init__(self, socket_path: Path, env: dict[str, str]) -> None:
        self.socket_path = socket_path
        self.env = {**env, "ONNXFN_ENGINE_SOCKET": str(socket_path)}
        self.child: ChildProcess | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="onnxfn-engine-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def _spawn(self) -> None:
        # Its own session (ChildProcess): a terminal's Ctrl-C or a group signal must not stop the
        # engine while the workers drain; the supervisor stops it last, and the kernel sends it
        # SIGTERM if the master dies first.
        argv = [sys.executable, "-m", "shared.engine"]
        self.child = ChildProcess("inference engine", argv, env=self.env).start()

    def _watch(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            assert self.child is not None
            started = time.monotonic()
            code = self.child.wait()
            if self._stopping.is_set():
                return
            self.socket_path.unlink(missing_ok=True)
            self.restarts += 1
            delay = 0.5 if time.monotonic() - started > 30 else min(delay * 2, 10.0)
            log.error("inference engine (pid %d) %s: restarting in %.1f s", self.child.pid, self._why(code), delay)
            if self._stopping.wait(delay):
                return
            self._spawn()

    def _why(self, code: int) -> str:
        """What ended the engine: its load failure when it left one, else its exit code. Code 0 is
        never the engine's own before a stop: gunicorn's arbiter, its parent, reaps every child
        (waitpid(-1)) and then the real status is gone."""
        try:
            return f"could not load the model (exit code 1: {failure_file(self.socket_path).read_text()})"
        except OSError:
            pass
        if code == 0:
            return "exited (its exit status was collected by gunicorn's arbiter)"
        return f"exited with code {code}" if code > 0 else f"was killed by signal {-code}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the engine finishes its runs), SIGKILL after `timeout`; returns its exit code."""
        self._stopping.set()
        if self.child is None:
            return None
        code = self.child.stop(timeout)
        self.socket_path.unlink(missing_ok=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
