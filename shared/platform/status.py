"""`onnxfn status`: services, revisions, traffic, processes, waiting requests, URLs, last cold start.

Asks the running platform (`onnxfn platform` or `onnxfn up`; its gateway URL from `--url` or the
state file it writes) for `/status`. With no platform running it shows the Service files at zero.
Under `onnxfn up` it also shows the event plane's components (consumer groups, Kafka writer, broker
ingress: ready, starting or failed, with restarts) from the ingress's `/health`, and exits 1 when
one has failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT
from shared.platform.platform import default_state_file, plane_state_file
from shared.platform.spec import SpecError, load_service
from shared.process import http_get
from shared.service_files import served


def fetch(url: str) -> dict[str, Any] | None:
    """The platform's `/status` at gateway `url`; None when nothing answers."""
    status, body = http_get(url.rstrip("/") + "/status", timeout=3.0)
    if status != 200:
        return None
    data: dict[str, Any] = json.loads(body)
    return data


def offline(knative_dir: Path) -> dict[str, Any]:
    """What the Service files say, every revision at zero (no platform running)."""
    services: list[dict[str, Any]] = []
    try:
        files = served(knative_dir)
    except SpecError as exc:
        return {"services": [], "error": str(exc)}
    for name, file in sorted(files.items()):
        path = file.path
        try:
            spec = load_service(file)
        except SpecError as exc:
            services.append({"name": name, "file": str(path), "error": str(exc), "traffic": [], "revisions": []})
            continue
        services.append(
            {
                "name": name,
                "file": str(path),
                "url": "",
                "latest": spec.latest,
                "traffic": [
                    {"revision": t.revision, "percent": t.percent, "tag": t.tag, "url": ""} for t in spec.traffic
                ],
                "revisions": [
                    {"revision": r.name, "model_version": r.model_version, "ready": 0, "starting": 0, "waiting": 0}
                    for r in spec.revisions.values()
                ],
            }
        )
    return {"gateway": "", "running": False, "services": services}


def table(data: dict[str, Any]) -> str:
    """The human view: one row per revision."""
    header = ("SERVICE", "REVISION", "VER", "TRAFFIC", "TAGS", "PROCS", "STARTING", "WAITING", "URL", "LAST COLD START")
    rows: list[tuple[str, ...]] = [header]
    for service in data["services"]:
        if "error" in service:
            rows.append((service["name"], "-", "-", "-", "-", "-", "-", "-", "-", service["error"][:60]))
            continue
        first = True
        for rev in service["revisions"]:
            name = rev["revision"]
            percent = sum(t["percent"] for t in service["traffic"] if t["revision"] == name)
            tags = ",".join(t["tag"] for t in service["traffic"] if t["revision"] == name and t["tag"])
            cold = rev.get("last_cold_start")
            cold_text = "-"
            if cold:
                parts = cold["parts"]
                cold_text = (
                    f"{cold['seconds']:.3f}s (start {parts['process_start']:.3f}, load {parts['model_load']:.3f}, "
                    f"warm {parts['warmup']:.3f}, infer {parts['first_inference']:.3f})"
                )
            rows.append(
                (
                    service["name"] if first else "",
                    name,
                    str(rev.get("model_version", "")),
                    f"{percent}%",
                    tags or "-",
                    str(rev.get("ready", 0)),
                    str(rev.get("starting", 0)),
                    str(rev.get("waiting", 0)),
                    (service.get("url") or "-") if first else "",
                    cold_text,
                )
            )
            first = False
    lines = columns(rows)
    where = f"platform at {data['gateway']}" if data.get("gateway") else "platform not running (Service files shown)"
    return "\n".join([where, *lines])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--url", help="the platform's gateway URL (default: from its state file)")
    parser.add_argument("--knative", type=Path, default=PROJECT_ROOT / "knative", help="Service files (offline view)")
    parser.add_argument(
        "--state-file", type=Path, default=default_state_file(), help="the state file `up`/`platform` wrote"
    )


def run(args: argparse.Namespace) -> int:
    url = args.url
    state = args.state_file
    if url is None and state.exists():
        try:
            url = json.loads(state.read_text())["gateway"]
        except (ValueError, KeyError):
            url = None
    data = fetch(url) if url else None
    if data is None:
        if args.url:
            print(f"onnxfn status: no platform answers at {args.url}", file=sys.stderr)
            return 1
        data = offline(args.knative)
    else:
        data["running"] = True
    plane = plane_health(plane_state_file(state))
    if plane is not None:
        data["plane"] = plane
    print(json.dumps(data, indent=2) if args.json else table(data) + plane_table(plane))
    return 1 if plane and any(c["state"] == "failed" for c in plane["components"]) else 0


def plane_health(state_file: Path) -> dict[str, Any] | None:
    """The running event plane's `/health` (`url` and `components`), None when no plane runs."""
    try:
        url = str(json.loads(state_file.read_text())["ingress"])
    except (OSError, ValueError, KeyError):
        return None
    status, body = http_get(url + "/health", timeout=3.0)
    if status not in (200, 503):
        return {"url": url, "components": [], "error": f"no answer from {url}/health"}
    return {"url": url, **json.loads(body)}


def plane_table(plane: dict[str, Any] | None) -> str:
    """The event plane's components, a row each ('' without a plane)."""
    if plane is None:
        return ""
    if "error" in plane:
        return f"\n\nevent plane: {plane['error']}"
    rows = [("COMPONENT", "STATE", "RESTARTS", "DETAIL")]
    rows += [(c["component"], c["state"], str(c["restarts"]), c["detail"] or "-") for c in plane["components"]]
    return "\n\n" + "\n".join([f"event plane at {plane['url']}", *columns(rows)])


def columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows of cells as aligned text lines."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
