"""Services, revisions and traffic as the embedded platform reads them from `knative/` YAML.

The files come from `shared.service_files` (the CPU variant where one exists). A Service holds one
revision template (the latest revision, `spec.template.metadata.name`) and `spec.traffic`. A
revision named in traffic that is not the template is an earlier one (Knative keeps them); on one
machine it runs with the template's container and scaling settings and the model version its name
says (`<svc>-v<version>[-variant]`, as `onnxfn render` names revisions), so `onnxfn traffic digits
digits-v1-cpu=90 digits-v2-cpu=10` is a canary of v2 against v1.

The platform does not import the functions it serves: a revision is a container environment and
scaling settings. A model version the function does not have fails that revision's process at
start, with the function's own message in its log and the revision marked failed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.service_files import (
    AUTOSCALING,
    DEFAULT_NAMESPACE,
    DEFAULT_REVISION_TIMEOUT_S,
    DEFAULT_STABLE_WINDOW_S,
    DEFAULT_TARGET,
    DEFAULT_UTILIZATION,
    ServiceFile,
    SpecError,
    parse_go_duration,
    served,
)

MODEL_VERSION_LABEL = "onnxfn.dev/model-version"
MODEL_VERSION_ENV = "ONNXFN_MODEL_VERSION"
__all__ = ["DEFAULT_NAMESPACE", "RevisionSpec", "ServiceSpec", "SpecError", "load_service", "load_services"]


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
    model_version: str  # "" : the function's default version
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

    @property
    def target_value(self) -> float:
        """In-flight requests per process the autoscaler aims at (Knative autoscaling: concurrency target)."""
        total = self.target if self.target is not None else float(self.container_concurrency or DEFAULT_TARGET)
        if self.target is not None and self.container_concurrency:
            total = min(total, float(self.container_concurrency))
        return max(0.01, total * self.utilization / 100)

    def wanted(self, concurrency: float) -> int:
        """Processes for `concurrency` in-flight requests (before min/max bounds)."""
        return math.ceil(concurrency / self.target_value) if concurrency > 0 else 0

    def process_env(self) -> dict[str, str]:
        """The container's environment plus the runtime contract's K_* and the model version."""
        version = {MODEL_VERSION_ENV: self.model_version} if self.model_version else {}
        return {
            **self.env,
            "ONNXFN_FUNCTION": self.function,
            **version,
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


def _model_version(service: str, revision: str, labels: Mapping[str, Any] | None, env: Mapping[str, str]) -> str:
    """The revision's label, else the version in its name, else the container's ONNXFN_MODEL_VERSION."""
    if labels and MODEL_VERSION_LABEL in labels:
        return str(labels[MODEL_VERSION_LABEL])
    match = re.fullmatch(rf"{re.escape(service)}-v([0-9a-z]+)(?:-[-a-z0-9]+)?", revision)
    return match.group(1) if match else env.get(MODEL_VERSION_ENV, "")


def _revision(doc: Mapping[str, Any], name: str, labels: Mapping[str, Any] | None, where: str) -> RevisionSpec:
    service = doc["metadata"]["name"]
    template = doc["spec"]["template"]
    annotations = template.get("metadata", {}).get("annotations", {}) or {}
    spec = template.get("spec", {})
    container = (spec.get("containers") or [{}])[0]
    env = {str(e["name"]): str(e["value"]) for e in container.get("env", []) or [] if "value" in e}
    target = _annotation(annotations, "target")
    window = _annotation(annotations, "window")
    retention = _annotation(annotations, "scale-to-zero-pod-retention-period", "scaleToZeroPodRetentionPeriod")
    cpu = (container.get("resources", {}).get("requests", {}) or {}).get("cpu", "1")
    try:
        return RevisionSpec(
            name=name,
            service=service,
            function=env.get("ONNXFN_FUNCTION", service),
            model_version=_model_version(service, name, labels, env),
            env=env,
            container_concurrency=int(spec.get("containerConcurrency", 0) or 0),
            timeout_s=float(spec.get("timeoutSeconds", DEFAULT_REVISION_TIMEOUT_S)),
            min_scale=int(_annotation(annotations, "min-scale", "minScale") or 0),
            max_scale=int(_annotation(annotations, "max-scale", "maxScale") or 0),
            target=float(target) if target is not None else None,
            utilization=float(
                _annotation(annotations, "target-utilization-percentage", "targetUtilizationPercentage")
                or DEFAULT_UTILIZATION
            ),
            stable_window_s=parse_go_duration(window) if window else DEFAULT_STABLE_WINDOW_S,
            retention_s=parse_go_duration(retention) if retention else 0.0,
            cpu=parse_cpu(cpu),
        )
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: revision {name}: {exc}") from None


def load_service(file: ServiceFile, namespace: str = DEFAULT_NAMESPACE) -> ServiceSpec:
    """One Service as the platform runs it; SpecError says what is wrong."""
    doc, path = file.document, file.path
    try:
        service = doc["metadata"]["name"]
        template_meta = doc["spec"]["template"].get("metadata", {}) or {}
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
    except (KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{path}: not a Knative Service the platform can run ({type(exc).__name__}: {exc})") from None
    total = sum(t.percent for t in traffic)
    if total != 100:
        raise SpecError(f"{path}: traffic percents sum to {total}, want 100")
    tags = {t.tag: t.revision for t in traffic if t.tag}
    return ServiceSpec(service, namespace, path, latest, revisions, tuple(traffic), tags)


def load_services(
    knative_dir: Path, names: Iterable[str] | None = None, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, ServiceSpec]:
    """The Services the platform serves from `knative_dir` (every one, or `names`)."""
    return {name: load_service(file, namespace) for name, file in served(knative_dir, names).items()}
