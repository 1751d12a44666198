"""`onnxfn status`: services, revisions, traffic, processes, waiting requests, URLs, last cold start.

Asks the running platform (`onnxfn platform` or `onnxfn up`; its gateway URL from `--url` or the
state file it writes) for `/status`. With no platform running it shows the Service files at zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT
from shared.platform.platform import default_state_file
from shared.platform.spec import SpecError, load_service, service_files
from shared.process import http_get


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
    for name, path in sorted(service_files(knative_dir).items()):
        try:
            spec = load_service(path)
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    where = f"platform at {data['gateway']}" if data.get("gateway") else "platform not running (Service files shown)"
    return "\n".join([where, *lines])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--url", help="the platform's gateway URL (default: from its state file)")
    parser.add_argument("--knative", type=Path, default=PROJECT_ROOT / "knative", help="Service files (offline view)")


def run(args: argparse.Namespace) -> int:
    url = args.url
    state = default_state_file()
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
    print(json.dumps(data, indent=2) if args.json else table(data))
    return 0
