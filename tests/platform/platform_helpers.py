"""Platform test helpers: a private copy of the digits Service file and a keep-alive client."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from shared.config import PROJECT_ROOT
from shared.platform import Platform
from shared.render import replace_traffic

SOURCE = PROJECT_ROOT / "knative" / "cpu" / "service-digits.yaml"
IMAGE = [[0, 0, 7, 16, 14, 3, 0, 0]] * 8
BODY = json.dumps({"image": IMAGE}).encode()
HEADERS = {
    "Content-Type": "application/json",
    "Ce-Specversion": "1.0",
    "Ce-Id": "t-1",
    "Ce-Source": "/tests/platform",
    "Ce-Type": "dev.onnxfn.digits.request",
}


def write_service(directory: Path, traffic: list[dict[str, Any]] | None = None, min_scale: int | None = None) -> Path:
    """Copy the digits CPU Service into `directory`, optionally with other traffic or min-scale."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "service-digits.yaml"
    text = SOURCE.read_text()
    if min_scale is not None:
        text = text.replace(
            "autoscaling.knative.dev/min-scale: '0'", f"autoscaling.knative.dev/min-scale: '{min_scale}'"
        )
    if traffic is not None:
        text = replace_traffic(text, traffic)
    path.write_text(text)
    assert yaml.safe_load(path.read_text())["metadata"]["name"] == "digits"
    return path


class Client:
    """A keep-alive client for one URL; `post()` -> (status, model version that answered)."""

    def __init__(self, url: str, host: str | None = None) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.headers = {**HEADERS, **({"Host": host} if host else {})}
        self.conn: http.client.HTTPConnection | None = None

    def post(self) -> tuple[int, str]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.address, timeout=60)
            try:
                self.conn.request("POST", "/", body=BODY, headers=self.headers)
                response = self.conn.getresponse()
                response.read()
                return response.status, response.getheader("ce-modelversion") or ""
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until true; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def revision(platform: Platform, name: str) -> dict[str, Any]:
    """The status of one revision of digits."""
    service = next(s for s in platform.status()["services"] if s["name"] == "digits")
    found: dict[str, Any] = next(r for r in service["revisions"] if r["revision"] == name)
    return found
