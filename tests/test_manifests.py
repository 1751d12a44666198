"""Every manifest under knative/ and eventing/ against the official CRD schemas, and their consistency."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import knative_crds as crds
import pytest
import yaml

from shared import render
from shared.config import PROJECT_ROOT
from shared.contract import function_names, load_handler
from shared.traffic import check_traffic

CRD_DIR = Path(os.environ.get("ONNXFN_KNATIVE_CRDS", PROJECT_ROOT.parent / "shared" / "knative-crds"))
needs_crds = pytest.mark.skipif(
    not (CRD_DIR / "service.yaml").exists(),
    reason=f"official Knative CRDs not found at {CRD_DIR} (set ONNXFN_KNATIVE_CRDS)",
)
MANIFESTS = sorted([*(PROJECT_ROOT / "knative").rglob("*.yaml"), *(PROJECT_ROOT / "eventing").rglob("*.yaml")])
SERVICE_FILES = sorted((PROJECT_ROOT / "knative").rglob("service-*.yaml"))
AUTOSCALING = "autoscaling.knative.dev/"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _rel(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _filtered_type(spec: dict[str, Any]) -> str | None:
    """The exact `type` a Trigger matches: `filter.attributes.type` or a top-level `filters[].exact.type`."""
    exact = (spec.get("filter") or {}).get("attributes", {}).get("type")
    if exact is None:
        types = [f["exact"]["type"] for f in spec.get("filters") or [] if "type" in f.get("exact", {})]
        exact = types[0] if len(types) == 1 else None
    return str(exact) if exact is not None else None


def test_there_are_manifests() -> None:
    assert len(SERVICE_FILES) >= len(function_names()) >= 1


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_manifest_matches_crd_schema(path: Path) -> None:
    assert crds.validate_file(path, CRD_DIR) == []


@needs_crds
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["spec"]["template"]["spec"].update(gpuCount=1), "'gpuCount' was unexpected"),
        (lambda d: d["spec"]["template"]["spec"].update(containerConcurrency="32"), "is not of type 'integer'"),
        (lambda d: d["spec"]["template"]["spec"].pop("containers"), "'containers' is a required property"),
        (lambda d: d["spec"]["traffic"][0].update(percent=True), "is not of type 'integer'"),
        (lambda d: d["spec"]["template"]["metadata"]["annotations"].update(x=1), "1 is not of type 'string'"),
        (lambda d: d["metadata"].update(nmae="x"), "'nmae' was unexpected"),
        (lambda d: d["metadata"].update(name="Digits_1"), "does not match"),
        (lambda d: d.update(status2={}), "'status2' was unexpected"),
        (lambda d: d.update(apiVersion="serving.knative.dev/v2"), "no schema for apiVersion"),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "ONNXFN_FUNCTION"}),
            "have the same key (name='ONNXFN_FUNCTION')",
        ),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu=[1]),
            "is not valid under any of the given schemas",
        ),
    ],
)
def test_validator_rejects_bad_documents(change: Any, expected: str) -> None:
    doc = _docs(SERVICE_FILES[0])[0]
    assert crds.validate_manifest(doc, CRD_DIR) == []
    change(doc)
    errors = crds.validate_manifest(doc, CRD_DIR)
    assert any(expected in error for error in errors), errors


@needs_crds
def test_validator_checks_eventing_kinds_and_configmaps() -> None:
    trigger = {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": "t"},
        "spec": {"broker": 1, "subscriber": {"ref": {"kind": "Service", "name": "digits"}, "colour": 1}},
    }
    errors = crds.validate_manifest(trigger, CRD_DIR)
    assert any("$.spec.broker: 1 is not of type 'string'" in e for e in errors), errors
    assert any("'colour' was unexpected" in e for e in errors), errors
    source = {"apiVersion": "sources.knative.dev/v1", "kind": "KafkaSource", "metadata": {"name": "s"}, "spec": {}}
    errors = crds.validate_manifest(source, CRD_DIR)
    assert any("'topics' is a required property" in e for e in errors), errors
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": 1}}
    assert any("1 is not of type 'string'" in e for e in crds.validate_manifest(config_map, CRD_DIR))
    assert crds.validate_manifest({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}, CRD_DIR)


@needs_crds
def test_validate_file_reports_document_index(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    good = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}
    path.write_text(yaml.safe_dump_all([good, {**good, "extra": 1}]))
    errors = crds.validate_file(path, CRD_DIR)
    assert len(errors) == 1 and "#1: ConfigMap/a: $: Additional properties" in errors[0]


def test_autoscaling_annotations_only_on_revision_template() -> None:
    for path in MANIFESTS:
        for doc in _docs(path):
            outer = doc.get("metadata", {}).get("annotations", {})
            assert not [k for k in outer if k.startswith(AUTOSCALING)], f"{_rel(path)}: on {doc['kind']} metadata"


@pytest.mark.parametrize("path", SERVICE_FILES, ids=_rel)
def test_service_numbers_agree(path: Path) -> None:
    (doc,) = _docs(path)
    name = doc["metadata"]["name"]
    config = load_handler(name).config
    template = doc["spec"]["template"]
    pod, annotations = template["spec"], template["metadata"]["annotations"]
    (container,) = pod["containers"]
    env = _env(container)
    workers, per_worker = int(env["ONNXFN_WORKERS"]), config.concurrency
    assert workers == config.workers
    assert env["ONNXFN_FUNCTION"] == name
    cc = pod["containerConcurrency"]
    assert cc == workers * per_worker
    target = int(annotations[f"{AUTOSCALING}target"])
    assert 1 <= target <= cc
    assert 1 <= int(annotations[f"{AUTOSCALING}target-utilization-percentage"]) <= 100
    assert annotations[f"{AUTOSCALING}class"] == "kpa.autoscaling.knative.dev"
    assert annotations[f"{AUTOSCALING}metric"] == "concurrency"
    assert annotations[f"{AUTOSCALING}min-scale"] == "0"
    assert int(annotations[f"{AUTOSCALING}max-scale"]) >= int(annotations[f"{AUTOSCALING}initial-scale"]) >= 1
    assert annotations[f"{AUTOSCALING}scale-to-zero-pod-retention-period"] == config.scaling.retention_period
    timeout = pod["timeoutSeconds"]
    graceful = int(env["ONNXFN_GRACEFUL_TIMEOUT"])
    assert 0 < graceful < timeout - render.DRAIN_S, "gunicorn must finish before the pod's grace period ends"
    assert config.scaling.timeout_seconds < timeout <= render.MAX_REVISION_TIMEOUT_S, "no room for a cold start"
    startup = container["startupProbe"]
    startup_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert int(annotations["serving.knative.dev/progress-deadline"].removesuffix("s")) > startup_s
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/liveness"
    assert "PORT" not in env and "command" not in container, "Knative sets PORT; the image's CMD starts the server"


@pytest.mark.parametrize("path", SERVICE_FILES, ids=_rel)
def test_revision_names_and_traffic(path: Path) -> None:
    (doc,) = _docs(path)
    name = doc["metadata"]["name"]
    config = load_handler(name).config
    revision = doc["spec"]["template"]["metadata"]["name"]
    assert revision.startswith(f"{name}-v{config.model_version}")
    assert check_traffic(doc["spec"]["traffic"]) == []
    tags = [t["tag"] for t in doc["spec"]["traffic"] if "tag" in t]
    assert tags, "tags give canary URLs"


def test_gpu_variant_for_each_model_function() -> None:
    for name in function_names():
        config = load_handler(name).config
        docs = {p.parent.name: _docs(p)[0] for p in SERVICE_FILES if p.name == f"service-{name}.yaml"}
        if config.model_file is None:
            assert set(docs) == {"knative"}
            continue
        assert set(docs) == {"knative", "cpu"}
        gpu, cpu = (docs[k]["spec"]["template"]["spec"] for k in ("knative", "cpu"))
        assert gpu["containers"][0]["resources"]["limits"][render.GPU_RESOURCE] == 1
        assert gpu["nodeSelector"] == render.GPU_NODE_SELECTOR and gpu["tolerations"] == [render.GPU_TOLERATION]
        assert render.GPU_RESOURCE not in cpu["containers"][0]["resources"]["limits"]
        assert "nodeSelector" not in cpu and "tolerations" not in cpu
        assert _env(gpu["containers"][0])["ONNXFN_PROVIDERS"] == "cuda"
        assert _env(cpu["containers"][0])["ONNXFN_PROVIDERS"] == "cpu"


def test_config_features_patch_enables_gpu_scheduling_fields() -> None:
    (doc,) = _docs(PROJECT_ROOT / "knative" / "config-features-patch.yaml")
    assert doc["metadata"] == {"name": "config-features", "namespace": "knative-serving"}
    assert doc["data"]["kubernetes.podspec-nodeselector"] == "enabled"
    assert doc["data"]["kubernetes.podspec-tolerations"] == "enabled"


def test_trigger_subscribers_exist_and_filters_match_functions() -> None:
    services = {_docs(p)[0]["metadata"]["name"] for p in SERVICE_FILES}
    accepts = {t: name for name in function_names() for t in load_handler(name).config.accepts}
    for path in sorted((PROJECT_ROOT / "eventing").glob("*.yaml")):
        for doc in _docs(path):
            if doc["kind"] != "Trigger":
                continue
            ref = doc["spec"]["subscriber"].get("ref", {})
            if ref.get("kind") != "Service":
                continue
            assert ref["name"] in services, f"{_rel(path)}: subscriber {ref['name']} has no knative/ Service"
            wanted = _filtered_type(doc["spec"])
            assert wanted is not None, f"{_rel(path)}: a function trigger must filter on one exact type"
            assert accepts.get(wanted) == ref["name"], f"{_rel(path)}: {wanted} is not accepted by {ref['name']}"
            own = set(load_handler(ref["name"]).config.result_types)
            assert wanted not in own, f"{_rel(path)}: {ref['name']}'s results would loop back to it"
