"""The committed Knative Service files: one reader, one rule for which variant runs where, and the
Knative names and defaults that the renderer, `onnxfn traffic`, the platform and the eventing loader
share.

    knative/service-<fn>.yaml       the default variant (GPU for a function with a model)
    knative/cpu/service-<fn>.yaml   the CPU variant of the same Service (same name)

A cluster applies one variant of each Service. The embedded platform runs on this machine's CPU, so
it serves the CPU variant where one exists (`served`); `onnxfn traffic` edits every variant.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.config import PROJECT_ROOT

KNATIVE_DIR = PROJECT_ROOT / "knative"
SERVICE_API = "serving.knative.dev/v1"
DEFAULT_VARIANT = "default"
CPU_VARIANT = "cpu"
AUTOSCALING = "autoscaling.knative.dev/"
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035: Service names and traffic tags

# Knative Serving's defaults where a Service leaves a field out (Knative autoscaling: concurrency target).
DEFAULT_NAMESPACE = "default"
DEFAULT_STABLE_WINDOW_S = 60.0  # config-autoscaler stable-window
DEFAULT_REVISION_TIMEOUT_S = 300  # config-defaults revision-timeout-seconds
DEFAULT_TARGET = 100.0  # container-concurrency-target-default
DEFAULT_UTILIZATION = 70.0  # container-concurrency-target-percentage

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class SpecError(ValueError):
    """A YAML resource the project cannot run as written (the message names the file and the field)."""


def parse_go_duration(text: str | int | float) -> float:
    """A Go duration as Knative's annotations use it (`60s`, `1m30s`, `500ms`) or seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    raw = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return float(raw)
    parts = _GO_DURATION.findall(raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        raise SpecError(f"{text!r} is not a duration")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass(frozen=True)
class ServiceFile:
    """One Knative Service document as committed: its file, the parsed document, its text, its variant."""

    path: Path
    document: dict[str, Any]
    text: str
    variant: str

    @property
    def name(self) -> str:
        return str(self.document["metadata"]["name"])

    @property
    def cpu(self) -> bool:
        return self.variant == CPU_VARIANT


def read_file(path: Path, variant: str | None = None) -> list[ServiceFile]:
    """Every Service document in one YAML file (other kinds are skipped); SpecError names the file."""
    try:
        text = path.read_text()
        documents = list(yaml.safe_load_all(text))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not readable YAML ({type(exc).__name__}: {exc})") from None
    if not text.strip():  # a file caught mid-write by a non-atomic editor: never "no Services"
        raise SpecError(f"{path}: empty file")
    variant = variant or (CPU_VARIANT if path.parent.name == CPU_VARIANT else DEFAULT_VARIANT)
    found = []
    for document in documents:
        if not isinstance(document, dict) or document.get("kind") != "Service":
            continue
        name = (document.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not DNS_LABEL.match(name):
            raise SpecError(f"{path}: metadata.name: {name!r} is not a DNS-1035 label")
        if not isinstance(document.get("spec"), dict) or not isinstance(document["spec"].get("template"), dict):
            raise SpecError(f"{path}: Service/{name}: spec.template is missing")
        found.append(ServiceFile(path, document, text, variant))
    return found


def write_file(path: Path, text: str) -> None:
    """Replace a Service file in one step: a platform watching the folder never reads half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def read_all(directory: Path) -> list[ServiceFile]:
    """Every Service in `<dir>/*.yaml` (default variant) and `<dir>/cpu/*.yaml` (CPU variant)."""
    found: list[ServiceFile] = []
    for folder in (directory, directory / CPU_VARIANT):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            found += read_file(path)
    return found


def variants(directory: Path, name: str) -> list[ServiceFile]:
    """Every committed variant of one Service (default first)."""
    return [f for f in read_all(directory) if f.name == name]


def served(directory: Path, names: Iterable[str] | None = None) -> dict[str, ServiceFile]:
    """Service name -> the variant the embedded platform serves: CPU where present, else the default.
    With `names`, exactly those (SpecError names any without a file)."""
    chosen: dict[str, ServiceFile] = {}
    for file in read_all(directory):
        if file.name not in chosen or file.cpu:
            chosen[file.name] = file
    if names is None:
        return chosen
    wanted = list(names)
    missing = sorted(set(wanted) - set(chosen))
    if missing:
        raise SpecError(f"no Service file for {', '.join(missing)} in {directory}")
    return {name: chosen[name] for name in wanted}


def service_names(directory: Path) -> frozenset[str]:
    """The names of the Services committed in `directory` (either variant)."""
    return frozenset(f.name for f in read_all(directory))
