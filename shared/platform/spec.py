"""Services, revisions and traffic as the embedded platform reads them from `knative/` YAML.

One Service file per function: `knative/cpu/service-<fn>.yaml` when present (this machine has no
GPU), else `knative/service-<fn>.yaml`. The file holds one revision template (the latest revision,
`spec.template.metadata.name`) and `spec.traffic`. A revision named in traffic that is not the
template is an earlier one (Knative keeps them); on one machine it runs with the template's
container and scaling settings and the model version its name says (`<svc>-v<version>[-variant]`,
as `onnxfn render` names revisions), so `onnxfn traffic digits digits-v1-cpu=90 digits-v2-cpu=10`
is a canary of v2 against v1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.contract import load_handler

AUTOSCALING = "autoscaling.knative.dev/"
MODEL_VERSION_LABEL = "onnxfn.dev/model-version"
DEFAULT_NAMESPACE = "default"
DEFAULT_STABLE_WINDOW_S = 60.0  # config-autoscaler stable-window
DEFAULT_TIMEOUT_S = 300  # config-defaults revision-timeout-seconds
DEFAULT_TARGET = 100.0  # container-concurrency-target-default
DEFAULT_UTILIZATION = 70.0  # container-concurrency-target-percentage
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class SpecError(ValueError):
    """A Service file the platform cannot run (the message names the file and the field)."""


def parse_duration(text: str | int | float) -> float:
    """A Go duration (`60s`, `1m30s`, `500ms`) or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    raw = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return float(raw)
    parts = _DURATION.findall(raw)
    if not parts or "".join(n + u for n, u in parts) != raw:
        raise SpecError(f"{text!r} is not a duration")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_cpu(text: str | int | float) -> float:
    """A Kubernetes CPU quantity (`2`, `500m`) -> cores."""
    raw = str(text).strip()
    return float(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)


@dataclass(frozen=True)
class RevisionSpec:
    """One revision: the function process it runs and how it scales (Knative semantics)."""

    name: str
    service: str
    function: str
    model_version: str
    env: Mapping[str, str]
    container_concurrency: int
    timeout_s: float
    min_scale: int
    max_scale: int  # 0: unbounded
    target: float | None
    utilization: float
    stable_window_s: float
    retention_s: float
    cpu: float
    workers: int

    @property
    def target_value(self) -> float:
        """In-flight requests per process the autoscaler aims at (knative.md 2.2)."""
        total = self.target if self.target is not None else float(self.container_concurrency or DEFAULT_TARGET)
        if self.target is not None and self.container_concurrency:
            total = min(total, float(self.container_concurrency))
        return max(0.01, total * self.utilization / 100)

    def wanted(self, concurrency: float) -> int:
        """Processes for `concurrency` in-flight requests (before min/max bounds)."""
        return math.ceil(concurrency / self.target_value) if concurrency > 0 else 0

    def process_env(self) -> dict[str, str]:
        """The container's environment plus the runtime contract's K_* and the model version."""
        return {
            **self.env,
            "ONNXFN_FUNCTION": self.function,
            "ONNXFN_MODEL_VERSION": self.model_version,
            "K_SERVICE": self.service,
            "K_CONFIGURATION": self.service,
            "K_REVISION": self.name,
        }


@dataclass(frozen=True)
class TrafficTarget:
    """One `spec.traffic` entry with `latestRevision` resolved to a revision name."""

    revision: str
    percent: int
    tag: str = ""


@dataclass(frozen=True)
class ServiceSpec:
    """One Knative Service as the platform runs it."""

    name: str
    namespace: str
    path: Path
    latest: str
    revisions: Mapping[str, RevisionSpec]
    traffic: tuple[TrafficTarget, ...]
    tags: Mapping[str, str] = field(default_factory=dict)  # tag -> revision

    @property
    def splits(self) -> list[tuple[str, int]]:
        """(revision, percent) for every revision with a share of the Service URL's traffic."""
        shares: dict[str, int] = {}
        for target in self.traffic:
            if target.percent:
                shares[target.revision] = shares.get(target.revision, 0) + target.percent
        return list(shares.items())


def _annotation(annotations: Mapping[str, Any], key: str, legacy: str | None = None) -> str | None:
    for name in (key, legacy):
        if name and AUTOSCALING + name in annotations:
            return str(annotations[AUTOSCALING + name])
    return None


def _model_version(service: str, revision: str, labels: Mapping[str, Any] | None) -> str | None:
    if labels and MODEL_VERSION_LABEL in labels:
        return str(labels[MODEL_VERSION_LABEL])
    match = re.fullmatch(rf"{re.escape(service)}-v([0-9a-z]+)(?:-[-a-z0-9]+)?", revision)
    return match.group(1) if match else None


def _revision(doc: Mapping[str, Any], name: str, labels: Mapping[str, Any] | None, where: str) -> RevisionSpec:
    service = doc["metadata"]["name"]
    template = doc["spec"]["template"]
    annotations = template.get("metadata", {}).get("annotations", {}) or {}
    spec = template.get("spec", {})
    container = (spec.get("containers") or [{}])[0]
    env = {str(e["name"]): str(e["value"]) for e in container.get("env", []) or [] if "value" in e}
    function = env.get("ONNXFN_FUNCTION", service)
    config = load_handler(function).config
    version = _model_version(service, name, labels) or config.model_version
    if config.model_file is not None and version not in config.model_versions:
        known = ", ".join(sorted(config.model_versions))
        raise SpecError(f"{where}: revision {name} wants model version {version}; {function} has {known}")
    target = _annotation(annotations, "target")
    window = _annotation(annotations, "window")
    retention = _annotation(annotations, "scale-to-zero-pod-retention-period", "scaleToZeroPodRetentionPeriod")
    cpu = (container.get("resources", {}).get("requests", {}) or {}).get("cpu", "1")
    try:
        return RevisionSpec(
            name=name,
            service=service,
            function=function,
            model_version=version,
            env=env,
            container_concurrency=int(spec.get("containerConcurrency", 0) or 0),
            timeout_s=float(spec.get("timeoutSeconds", DEFAULT_TIMEOUT_S)),
            min_scale=int(_annotation(annotations, "min-scale", "minScale") or 0),
            max_scale=int(_annotation(annotations, "max-scale", "maxScale") or 0),
            target=float(target) if target is not None else None,
            utilization=float(
                _annotation(annotations, "target-utilization-percentage", "targetUtilizationPercentage")
                or DEFAULT_UTILIZATION
            ),
            stable_window_s=parse_duration(window) if window else DEFAULT_STABLE_WINDOW_S,
            retention_s=parse_duration(retention) if retention else 0.0,
            cpu=parse_cpu(cpu),
            workers=int(env.get("ONNXFN_WORKERS", config.workers)),
        )
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: revision {name}: {exc}") from None


def load_service(path: Path, namespace: str = DEFAULT_NAMESPACE) -> ServiceSpec:
    """Read one Service file; SpecError says what is wrong."""
    try:
        doc = yaml.safe_load(path.read_text())
        service = doc["metadata"]["name"]
        template_meta = doc["spec"]["template"].get("metadata", {}) or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{path}: not a readable Knative Service ({type(exc).__name__}: {exc})") from None
    latest = template_meta.get("name") or f"{service}-latest"
    raw_traffic = doc["spec"].get("traffic") or [{"latestRevision": True, "percent": 100}]
    traffic: list[TrafficTarget] = []
    revisions: dict[str, RevisionSpec] = {}
    for entry in raw_traffic:
        name = str(entry.get("revisionName") or latest)
        if name not in revisions:
            labels = template_meta.get("labels") if name == latest else None
            revisions[name] = _revision(doc, name, labels, str(path))
        traffic.append(TrafficTarget(name, int(entry.get("percent") or 0), str(entry.get("tag") or "")))
    total = sum(t.percent for t in traffic)
    if total != 100:
        raise SpecError(f"{path}: traffic percents sum to {total}, want 100")
    tags = {t.tag: t.revision for t in traffic if t.tag}
    return ServiceSpec(service, namespace, path, latest, revisions, tuple(traffic), tags)


def service_files(knative_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Service name -> file: the CPU variant (`<dir>/cpu/`) when present, else `<dir>/`."""
    found: dict[str, Path] = {}
    for directory in (knative_dir, knative_dir / "cpu"):
        for path in sorted(directory.glob("service-*.yaml")):
            found[path.stem.removeprefix("service-")] = path
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise SpecError(f"no Service file for {', '.join(missing)} in {knative_dir}")
        found = {name: found[name] for name in names}
    return found
