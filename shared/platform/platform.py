"""The embedded platform: Knative Services from `knative/` served on one machine, at zero when idle.

    platform = Platform(PlatformOptions())
    platform.start()
    platform.url_for("digits")        # http://127.0.0.1:<port>/  (the Service URL)
    platform.tag_url("digits", "current")
    platform.stop()

Every Service URL and tag URL has its own loopback port (plain clients need nothing else); the
gateway port routes by Host header like a Knative ingress (`digits`, `digits.default.svc...`,
`current-digits...`) and answers the platform's own `/metrics`, `/status` and `/healthz` for any
other host. The Service files are watched: a traffic change (`onnxfn traffic`) takes effect
without a restart; requests in flight finish on the revision they started on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT
from shared.platform.activator import Activator, Route
from shared.platform.http import Request, simple_response
from shared.platform.metrics import PlatformMetrics, RevisionRow
from shared.platform.revision import RevisionRuntime, ScalingOptions
from shared.platform.spec import DEFAULT_NAMESPACE, ServiceSpec, SpecError, load_services
from shared.service_files import CPU_VARIANT

log = logging.getLogger(__name__)


def default_state_file() -> Path:
    """Where a running `onnxfn platform` / `onnxfn up` says its gateway URL (read by `onnxfn status`)."""
    return Path(tempfile.gettempdir()) / f"onnxfn-platform-{os.getuid()}.json"


def plane_state_file(platform_state: Path) -> Path:
    """Where `onnxfn up` says its event plane's ingress URL, beside the platform's state file."""
    return platform_state.with_name(platform_state.stem + "-plane.json")


@dataclass(frozen=True)
class PlatformOptions:
    """What the platform serves and how (None fields: from the Service files and Knative defaults)."""

    knative_dir: Path = PROJECT_ROOT / "knative"
    services: tuple[str, ...] | None = None
    host: str = "127.0.0.1"
    gateway_port: int = 0
    namespace: str = DEFAULT_NAMESPACE
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    tick_s: float = 0.25
    reload_interval_s: float = 0.25
    log_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    state_file: Path | None = None


class Platform:
    """Activator, revisions and their autoscalers on one event loop in a background thread."""

    def __init__(self, options: PlatformOptions | None = None) -> None:
        self.options = options or PlatformOptions()
        self.log_dir = self.options.log_dir or Path(tempfile.mkdtemp(prefix="onnxfn-platform-"))
        self.metrics = PlatformMetrics(self._rows)
        self.activator = Activator(self._resolve, self._resolve_host, self._admin)
        self.specs: dict[str, ServiceSpec] = {}
        self.runtimes: dict[tuple[str, str], RevisionRuntime] = {}
        self.routes: dict[Route, list[tuple[RevisionRuntime, int]]] = {}
        self.listeners: dict[Route, asyncio.Server] = {}
        self.ports: dict[Route, int] = {}
        self.gateway: asyncio.Server | None = None
        self.gateway_port = 0
        self.stamps: dict[Path, tuple[int, int]] = {}
        self.reload_error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- public API (any thread) ----------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        """Load the Services, open every URL, start min-scale processes; return when listening."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.new_event_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="onnxfn-platform"))
        self.loop = loop
        self.thread = threading.Thread(target=loop.run_forever, name="onnxfn-platform", daemon=True)
        self.thread.start()
        try:
            self._call(self._start(), timeout_s)
        except BaseException:
            self.stop()
            raise
        if self.options.state_file is not None:
            state = {
                "pid": os.getpid(),
                "gateway": self.gateway_url,
                "urls": self.urls(),
                "log_dir": str(self.log_dir),
                "started_at": time.time(),
            }
            self.options.state_file.write_text(json.dumps(state) + "\n")

    def stop(self, timeout_s: float = 120.0) -> None:
        """Close every URL, answer what is in flight, stop every process."""
        loop, thread = self.loop, self.thread
        if loop is None or thread is None:
            return
        try:
            if loop.is_running():
                self._call(self._shutdown(), timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
            loop.close()
            self.loop = self.thread = None
            if self.options.state_file is not None:
                self.options.state_file.unlink(missing_ok=True)

    def url_for(self, service: str) -> str:
        """The Service URL (its own port): what the event plane should deliver to."""
        return self._url(Route(service))

    def tag_url(self, service: str, tag: str) -> str:
        """The URL of one traffic tag (`<tag>-<service>` in Knative), on its own port."""
        return self._url(Route(service, tag))

    def urls(self) -> dict[str, str]:
        """Service name -> Service URL, for every Service (the event plane's `function_urls`)."""
        return {name: self.url_for(name) for name in sorted(self.specs)}

    @property
    def gateway_url(self) -> str:
        """The Host-routed port; also serves `/metrics`, `/status`, `/healthz`."""
        return f"http://{self.options.host}:{self.gateway_port}/"

    def status(self) -> dict[str, Any]:
        """Services, revisions, traffic, processes, waiting requests, URLs, last cold starts."""
        result: dict[str, Any] = self._call(self._status_async(), 10.0)
        return result

    def reload(self) -> None:
        """Re-read the Service files now (they are also watched)."""
        self._call(self._reload_async(force=True), 30.0)

    def __enter__(self) -> Platform:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event loop side ------------------------------------------------------------------------------
    def _call(self, coro: Any, timeout_s: float) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def _url(self, route: Route) -> str:
        port = self.ports.get(route)
        if port is None:
            raise KeyError(f"no URL for {route.tag + '-' if route.tag else ''}{route.service}")
        return f"http://{self.options.host}:{port}/"

    async def _start(self) -> None:
        self.gateway = await asyncio.start_server(
            self.activator.handler(None), self.options.host, self.options.gateway_port, backlog=4096
        )
        self.gateway_port = self.gateway.sockets[0].getsockname()[1]
        await self._reload_async(force=True, strict=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._ticker()), loop.create_task(self._watcher())]

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        servers = [*self.listeners.values(), *([self.gateway] if self.gateway else [])]
        for server in servers:
            server.close()
        await asyncio.gather(*(runtime.close() for runtime in self.runtimes.values()))
        for writer in list(self.activator.connections):
            writer.close()
        self.listeners.clear()

    def _stamp(self) -> dict[Path, tuple[int, int]]:
        """Size and mtime of every YAML file that could hold a served Service."""
        stamps = {}
        directory = self.options.knative_dir
        for path in [*directory.glob("*.yaml"), *(directory / CPU_VARIANT).glob("*.yaml")]:
            try:
                stat = path.stat()
            except OSError:
                continue
            stamps[path] = (stat.st_mtime_ns, stat.st_size)
        return stamps

    async def _reload_async(self, force: bool = False, strict: bool = False) -> None:
        """Apply the Service files if they changed: new routes at once, old revisions wind down."""
        try:
            stamps = self._stamp()
            if not force and stamps == self.stamps:
                return
            self.stamps = stamps
            names = list(self.options.services) if self.options.services is not None else None
            specs = load_services(self.options.knative_dir, names, self.options.namespace)
        except SpecError as exc:
            if strict:
                raise
            if str(exc) != self.reload_error:
                log.error("Service files not applied (keeping the current routes): %s", exc)
            self.reload_error = str(exc)
            return
        self.reload_error = None
        await self._apply(specs)

    async def _apply(self, specs: dict[str, ServiceSpec]) -> None:
        wanted: set[tuple[str, str]] = set()
        for spec in specs.values():
            for name, revision in spec.revisions.items():
                key = (spec.name, name)
                wanted.add(key)
                runtime = self.runtimes.get(key)
                if runtime is None:
                    self.runtimes[key] = RevisionRuntime(
                        revision, self.options.scaling, self.metrics, self.log_dir, dict(self.options.env)
                    )
                else:
                    runtime.spec = revision
        for key, runtime in self.runtimes.items():
            runtime.reachable = key in wanted
        routes: dict[Route, list[tuple[RevisionRuntime, int]]] = {}
        for spec in specs.values():
            routes[Route(spec.name)] = [(self.runtimes[(spec.name, rev)], pct) for rev, pct in spec.splits]
            for tag, rev in spec.tags.items():
                routes[Route(spec.name, tag)] = [(self.runtimes[(spec.name, rev)], 100)]
        for route in routes.keys() - self.listeners.keys():
            server = await asyncio.start_server(
                self.activator.handler(route), self.options.host, self.ports.get(route, 0), backlog=4096
            )
            self.listeners[route] = server
            self.ports[route] = server.sockets[0].getsockname()[1]
        for route in self.listeners.keys() - routes.keys():
            self.listeners.pop(route).close()
        self.specs, self.routes = specs, routes  # the switch: one assignment in the loop thread
        for runtime in self.runtimes.values():
            runtime.tick()
        log.info("routes: %s", ", ".join(f"{r.tag + '-' if r.tag else ''}{r.service}" for r in routes))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick_s)
            for key, runtime in list(self.runtimes.items()):
                runtime.tick()
                idle = not (runtime.instances or runtime.retiring or runtime.waiters or runtime.tasks)
                if not runtime.reachable and idle:
                    del self.runtimes[key]

    async def _watcher(self) -> None:
        while True:
            await asyncio.sleep(self.options.reload_interval_s)
            await self._reload_async()

    def _resolve(self, route: Route) -> list[tuple[RevisionRuntime, int]] | None:
        return self.routes.get(route)

    def _resolve_host(self, host: str) -> Route | None:
        label = host.rsplit(":", 1)[0].split(".", 1)[0].lower() if host else ""
        if label in self.specs:
            return Route(label)
        for name, spec in self.specs.items():
            tag = label.removesuffix(f"-{name}")
            if tag != label and tag in spec.tags:
                return Route(name, tag)
        return None

    def _admin(self, request: Request) -> bytes | None:
        path = request.target.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.metrics.scrape()
            return simple_response(200, "OK", body, content_type)
        if path == "/status":
            return simple_response(200, "OK", json.dumps(self._status()).encode(), "application/json")
        if path == "/healthz":
            return simple_response(200, "OK", b"ok\n")
        return None

    async def _status_async(self) -> dict[str, Any]:
        return self._status()

    def _rows(self) -> Iterator[RevisionRow]:
        for (service, name), runtime in list(self.runtimes.items()):
            spec = self.specs.get(service)
            percent = dict(spec.splits).get(name, 0) if spec else 0
            yield service, name, runtime.ready, runtime.starting, len(runtime.waiters), runtime.inflight, percent

    def _status(self) -> dict[str, Any]:
        services = []
        for name, spec in sorted(self.specs.items()):
            revisions = [rt.status() for (svc, _), rt in sorted(self.runtimes.items()) if svc == name]
            services.append(
                {
                    "name": name,
                    "namespace": spec.namespace,
                    "file": str(spec.path),
                    "url": self._url(Route(name)),
                    "host": f"{name}.{spec.namespace}.svc.cluster.local",
                    "latest": spec.latest,
                    "traffic": [
                        {
                            "revision": t.revision,
                            "percent": t.percent,
                            "tag": t.tag,
                            "url": self._url(Route(name, t.tag)) if t.tag else "",
                        }
                        for t in spec.traffic
                    ],
                    "revisions": revisions,
                }
            )
        return {"gateway": self.gateway_url, "reload_error": self.reload_error, "services": services}
