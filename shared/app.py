"""The ASGI app of one function: the hot paths on the event loop, Flask for the rest.

`POST /` (CloudEvents) and `POST /v2/models/<name>[/versions/<v>]/infer` (Open Inference Protocol)
are the hot paths (thousands of requests a second on two cores): they read the ASGI scope directly
and await the pipeline, so concurrent requests of one worker batch together. Every other route
(health, OIP metadata and readiness, metrics) is a plain Flask view, run through a2wsgi's WSGI
bridge. Errors map to HTTP through `FunctionError.status`. Bodies are capped while they are read.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson
from a2wsgi import WSGIMiddleware
from flask import Flask, Response, request

from shared.asgi import ASGIApp, ClientGone, Receive, Scope, Send, event_headers, header_value, read_body, respond
from shared.errors import FunctionError, InvalidEvent
from shared.events import decode_http, encode_http
from shared.oip import (
    HEADER_LENGTH,
    SERVER_METADATA,
    decode_request,
    encode_response,
    error_body,
    model_metadata,
    split_body,
)
from shared.pipeline import Pipeline
from shared.readiness import readiness_state

log = logging.getLogger(__name__)

JSON = b"application/json"
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def error_response(error: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, JSON body) for any exception; unexpected ones become a 500 with no internals."""
    if isinstance(error, FunctionError):
        status, body = error.status, error.to_json()
    else:
        status, body = 500, {"error": "InternalError", "message": "unexpected server error"}
    headers = [(b"content-type", JSON)]
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    return status, headers, orjson.dumps(body)


class HotPaths:
    """`POST /` and the OIP infer route: decode, run the pipeline, answer."""

    def __init__(self, pipeline: Pipeline, max_body_bytes: int) -> None:
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes
        self.metrics = pipeline.metrics
        self.name = pipeline.config.name

    async def cloudevents(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        with self.pipeline.request():
            try:
                body = await read_body(scope, receive, self.max_body_bytes)
                mode, events = decode_http(event_headers(scope), body)
                if mode == "batch":
                    replies = await self.pipeline.process_batch(events)
                else:
                    replies = [await self.pipeline.process(events[0])]
                headers, payload = encode_http(mode, replies)
                status = 200
                response_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
                self.metrics.events("ok", len(events))
            except ClientGone:
                return
            except Exception as exc:
                status, response_headers, payload = self._failed(exc, "POST /")
                self.metrics.events("error" if status >= 500 else "rejected")
            self.metrics.request("cloudevents", status)
            self.metrics.latency.observe(time.perf_counter() - started)
            await respond(send, status, response_headers, payload)

    async def infer(self, scope: Scope, receive: Receive, send: Send, model: str, version: str | None) -> None:
        started = time.perf_counter()
        with self.pipeline.request():
            try:
                if model != self.name or version not in (None, self.pipeline.model_version):  # one version here
                    status, headers, payload = 404, [(b"content-type", JSON)], self._unknown(model, version)
                else:
                    body = await read_body(scope, receive, self.max_body_bytes)
                    text, binary = split_body(body, header_value(scope, HEADER_LENGTH.encode()))
                    try:
                        parsed = orjson.loads(text)
                    except orjson.JSONDecodeError as exc:
                        raise InvalidEvent(f"inference request is not valid JSON: {exc}") from None
                    known = [o.name for o in self.pipeline.model.outputs] if self.pipeline.model else None
                    request = decode_request(parsed, binary, known)
                    outputs = await self.pipeline.infer_tensors(request.feeds)
                    answer_headers, payload = encode_response(self.name, self.pipeline.model_version, outputs, request)
                    status = 200
                    headers = [(k.encode(), v.encode()) for k, v in answer_headers.items()]
            except ClientGone:
                return
            except Exception as exc:
                status, headers, payload = self._failed(exc, scope["path"])
                if isinstance(exc, FunctionError):  # the spec's error body: the message in `error`
                    payload = orjson.dumps(error_body(exc))
            self.metrics.request("/v2/models/<model>/infer", status)
            self.metrics.latency.observe(time.perf_counter() - started)
            await respond(send, status, headers, payload)

    def _unknown(self, model: str, version: str | None) -> bytes:
        what = f"model {model!r}" if model != self.name else f"version {version!r} of {model!r}"
        return orjson.dumps({"error": f"no {what} here (this function serves {self.name!r})", "kind": "NotFound"})

    @staticmethod
    def _failed(exc: Exception, where: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        status, headers, payload = error_response(exc)
        if status >= 500 and not isinstance(exc, FunctionError):
            log.exception("unexpected error on %s", where)
        else:
            log.debug("%s -> %d: %s", where, status, exc)
        return status, headers, payload


def create_flask_app(pipeline: Pipeline) -> Flask:
    """Health, Open Inference Protocol metadata and readiness, and metrics routes."""
    app = Flask(f"onnxfn.{pipeline.config.name}")
    name, version = pipeline.config.name, pipeline.model_version

    def json(body: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, mimetype="application/json")

    def readiness() -> Response:
        if pipeline.server_ready:
            return json(readiness_state(name, None, **pipeline.timings))
        response = json(readiness_state(name, pipeline.not_ready_error().message), 503)
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(Exception)
    def on_error(error: Exception) -> Response:
        code = getattr(error, "code", None)
        if isinstance(code, int) and not isinstance(error, FunctionError):  # werkzeug HTTPException
            return json({"error": type(error).__name__, "message": str(error)}, code)
        status, headers, body = error_response(error)
        if status >= 500 and not isinstance(error, FunctionError):
            log.exception("unexpected error on %s %s", request.method, request.path)
        return Response(body, status, [(k.decode(), v.decode()) for k, v in headers])

    @app.get("/health/liveness")
    @app.get("/v2/health/live")
    def live() -> Response:
        return json({"status": "alive", "live": True})

    app.add_url_rule("/health/readiness", "readiness", readiness)
    app.add_url_rule("/v2/health/ready", "v2_ready", readiness)

    @app.get("/v2")
    def server_metadata() -> Response:
        return json(SERVER_METADATA)

    @app.get("/v2/models/<model>")
    @app.get("/v2/models/<model>/versions/<model_version>")
    def metadata(model: str, model_version: str | None = None) -> Response:
        _known(model, model_version)
        return json(model_metadata(name, version, pipeline.model))

    @app.get("/v2/models/<model>/ready")
    @app.get("/v2/models/<model>/versions/<model_version>/ready")
    def model_ready(model: str, model_version: str | None = None) -> Response:
        _known(model, model_version)
        return readiness()

    def _known(model: str, model_version: str | None = None) -> None:
        from werkzeug.exceptions import NotFound

        if model != name:
            raise NotFound(f"no model {model!r} here (this function serves {name!r})")
        if model_version not in (None, version):  # this server serves one version of the model
            raise NotFound(f"no version {model_version!r} of {name!r} here (it serves version {version!r})")

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = pipeline.metrics.scrape()
        return Response(body, 200, content_type=content_type)

    @app.after_request
    def count(response: Response) -> Response:
        pipeline.metrics.request(request.url_rule.rule if request.url_rule else "other", response.status_code)
        return response

    return app


def create_app(pipeline: Pipeline, max_body_bytes: int) -> ASGIApp:
    """The function's ASGI app: hot paths on the loop, everything else through Flask.

    The lifespan starts the pipeline (model load in the background) and, at shutdown, lets the
    inference thread finish.
    """
    hot = HotPaths(pipeline, max_body_bytes)
    flask_asgi = WSGIMiddleware(create_flask_app(pipeline).wsgi_app)  # type: ignore[arg-type]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path == "/":
                if scope["method"] == "POST":
                    await hot.cloudevents(scope, receive, send)
                    return
                status, headers, payload = (
                    405,
                    [(b"allow", b"POST"), (b"content-type", JSON)],
                    (b'{"error":"MethodNotAllowed","message":"send CloudEvents with POST"}'),
                )
                pipeline.metrics.request("cloudevents", status)
                await respond(send, status, headers, payload)
                return
            if scope["method"] == "POST" and path.endswith("/infer"):
                match = INFER_PATH.match(path)
                if match:
                    await hot.infer(scope, receive, send, match.group(1), match.group(2))
                    return
            await flask_asgi(scope, receive, send)  # type: ignore[arg-type]
        elif kind == "lifespan":
            await _lifespan(pipeline, receive, send)

    return app


async def _lifespan(pipeline: Pipeline, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            pipeline.start(background=True)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            pipeline.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
