"""The WSGI app of one function: a lean CloudEvents endpoint at `POST /`, Flask for the rest.

`POST /` is the hot path (thousands of requests a second on two cores), so it reads the WSGI
environ directly instead of building a Flask request; every other route (health, Open Inference
Protocol v2, metrics) is a plain Flask view. Errors map to HTTP through `errors.status_of`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from flask import Flask, Response, request

from shared.errors import FunctionError, InvalidEvent, PayloadTooLarge
from shared.events import decode_http, encode_http
from shared.oip import decode_request, encode_response, model_metadata
from shared.pipeline import Pipeline

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
JSON = "application/json"
REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def error_response(error: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, JSON body) for any exception; unexpected ones become a 500 with no internals."""
    if isinstance(error, FunctionError):
        status, body = error.status, error.to_json()
    else:
        status, body = 500, {"error": "InternalError", "message": "unexpected server error"}
    headers = [("Content-Type", JSON)]
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after:
        headers.append(("Retry-After", str(retry_after)))
    return status, headers, orjson.dumps(body)


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            size = int(length)
        except ValueError:
            raise InvalidEvent(f"invalid Content-Length {length!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"body of {size} bytes is over the {limit}-byte limit")
        body: bytes = stream.read(size)
        return body
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    return body


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    """Content-Type and every `ce-*` header, lower-cased, from the WSGI environ."""
    headers = {key[5:].lower().replace("_", "-"): value for key, value in environ.items() if key[:8] == "HTTP_CE_"}
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["content-type"] = content_type
    return headers


class CloudEventsEndpoint:
    """`POST /`: decode, run the pipeline, answer in the request's mode."""

    def __init__(self, pipeline: Pipeline, max_body_bytes: int) -> None:
        self.pipeline = pipeline
        self.max_body_bytes = max_body_bytes
        self.metrics = pipeline.metrics

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        with self.pipeline.request():
            try:
                if environ["REQUEST_METHOD"] != "POST":
                    start_response("405 Method Not Allowed", [("Allow", "POST"), ("Content-Type", JSON)])
                    return [b'{"error":"MethodNotAllowed","message":"send CloudEvents with POST"}']
                body = _read_body(environ, self.max_body_bytes)
                mode, events = decode_http(_headers(environ), body)
                batch = mode == "batch"
                replies = self.pipeline.process_batch(events) if batch else [self.pipeline.process(events[0])]
                headers, payload = encode_http(mode, replies)
                status = 200
                response_headers = list(headers.items())
                self.metrics.events("ok", len(events))
            except Exception as exc:
                status, response_headers, payload = error_response(exc)
                if status >= 500 and not isinstance(exc, FunctionError):
                    log.exception("unexpected error on POST /")
                else:
                    log.debug("POST / -> %d: %s", status, exc)
                self.metrics.events("error" if status >= 500 else "rejected")
        self.metrics.request("cloudevents", status)
        self.metrics.latency.observe(time.perf_counter() - started)
        response_headers.append(("Content-Length", str(len(payload))))
        start_response(f"{status} {REASONS.get(status, '')}", response_headers)
        return [payload]


def create_flask_app(pipeline: Pipeline) -> Flask:
    """Health, Open Inference Protocol v2 and metrics routes."""
    app = Flask(f"onnxfn.{pipeline.config.name}")
    name, version = pipeline.config.name, pipeline.model_version

    def json(body: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, mimetype=JSON)

    def readiness() -> Response:
        if pipeline.server_ready:
            return json({"status": "ready", "function": name, **pipeline.timings})
        error = pipeline.not_ready_error()
        response = json({"status": "not ready", "function": name, "reason": error.message}, 503)
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
        return Response(body, status, headers)

    @app.get("/health/liveness")
    @app.get("/v2/health/live")
    def live() -> Response:
        return json({"status": "alive", "live": True})

    app.add_url_rule("/health/readiness", "readiness", readiness)
    app.add_url_rule("/v2/health/ready", "v2_ready", readiness)

    @app.get("/v2/models/<model>")
    def metadata(model: str) -> Response:
        _known(model)
        return json(model_metadata(name, version, pipeline.model))

    @app.get("/v2/models/<model>/ready")
    def model_ready(model: str) -> Response:
        _known(model)
        return readiness()

    @app.post("/v2/models/<model>/infer")
    def infer(model: str) -> Response:
        _known(model)
        started = time.perf_counter()
        body = request.get_data(cache=False)
        if len(body) > pipeline.settings.max_body_bytes:
            raise PayloadTooLarge(f"body is over the {pipeline.settings.max_body_bytes}-byte limit")
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"body is not valid JSON: {exc}") from None
        feeds, request_id = decode_request(parsed)
        outputs = pipeline.infer_tensors(feeds)
        pipeline.metrics.latency.observe(time.perf_counter() - started)
        return json(encode_response(name, version, outputs, request_id))

    def _known(model: str) -> None:
        if model != name:
            from werkzeug.exceptions import NotFound

            raise NotFound(f"no model {model!r} here (this function serves {name!r})")

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = pipeline.metrics.scrape()
        return Response(body, 200, content_type=content_type)

    @app.after_request
    def count(response: Response) -> Response:
        pipeline.metrics.request(request.url_rule.rule if request.url_rule else "other", response.status_code)
        return response

    return app


def create_app(pipeline: Pipeline, max_body_bytes: int) -> WSGIApp:
    """The function's WSGI app: `/` to the CloudEvents endpoint, everything else to Flask."""
    flask_app = create_flask_app(pipeline)
    endpoint = CloudEventsEndpoint(pipeline, max_body_bytes)
    flask_wsgi = flask_app.wsgi_app

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/":
            return endpoint(environ, start_response)
        return flask_wsgi(environ, start_response)

    return app
