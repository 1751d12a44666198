"""`onnxfn render` for worker Triggers: Deployment (Kubernetes' schema), ScaledObject and
TriggerAuthentication (KEDA's CRDs, vendored in tests/fixtures/keda), numbers from the YAML."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from knative_crds import validate_manifest

from shared import render
from shared.contract import function_names, load_handler
from shared.eventing import spec
from shared.eventing.broker_process import client_settings, keda_auth_settings
from shared.eventing.worker import WorkerPlan
from shared.render_worker import lag_threshold

ROOT = Path(__file__).resolve().parents[1]
KEDA_CRDS = Path(os.environ.get("KEDA_CRDS_DIR", ROOT / "tests" / "fixtures" / "keda"))
K8S_VERSION = "1.33"
WORKER_FILES = sorted((ROOT / "workers").rglob("*.yaml"))


def _docs(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def _k8s_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [exc.message]
    return []


def test_committed_workers_match_render() -> None:
    files = render.render_all(render.KNATIVE_DIR, eventing=(ROOT / "eventing", ROOT / "workers"))
    workers = {p: t for p, t in files.items() if p.is_relative_to(ROOT / "workers")}
    assert sorted(workers) == WORKER_FILES, "run `onnxfn render` and commit workers/"
    for path, text in workers.items():
        assert path.read_text() == text, f"{path} differs from the rendered text: run `onnxfn render`"


@pytest.mark.parametrize("path", WORKER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_worker_file_is_valid_for_kubernetes_and_keda(path: Path) -> None:
    docs = _docs(path)
    assert sorted(docs) == ["ConfigMap", "Deployment", "ScaledObject", "TriggerAuthentication"]
    assert _k8s_errors(docs["Deployment"]) == []
    for kind in ("ScaledObject", "TriggerAuthentication", "ConfigMap"):
        assert validate_manifest(docs[kind], KEDA_CRDS) == [], kind


def test_validators_reject_what_the_api_server_would() -> None:
    docs = _docs(ROOT / "workers" / "worker-embed.yaml")
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert "'resource' was unexpected" in _k8s_errors(bad)[0]
    bad = copy.deepcopy(docs["ScaledObject"])
    bad["spec"]["minReplicas"] = 0
    assert any("minReplicas" in e for e in validate_manifest(bad, KEDA_CRDS))
    bad = copy.deepcopy(docs["ScaledObject"])
    bad["spec"]["maxReplicaCount"] = "4"
    assert any("is not of type 'integer'" in e for e in validate_manifest(bad, KEDA_CRDS))


def test_numbers_and_shape_follow_the_trigger_and_the_function() -> None:
    loaded = spec.load(ROOT / "eventing", services=function_names())
    trigger = next(t for t in loaded.triggers if t.worker)
    assert trigger.subscriber.ref is not None
    name = trigger.subscriber.ref.name
    config = load_handler(name).config
    broker = loaded.brokers[f"{trigger.namespace}/{trigger.broker}"]
    gpu, cpu = _docs(ROOT / "workers" / f"worker-{name}.yaml"), _docs(ROOT / "workers" / "cpu" / f"worker-{name}.yaml")
    scaled = gpu["ScaledObject"]["spec"]
    kafka = scaled["triggers"][0]
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] == broker.partitions
    assert scaled["scaleTargetRef"]["name"] == gpu["Deployment"]["metadata"]["name"]
    assert (
        kafka["type"] == "kafka"
        and kafka["authenticationRef"]["name"] == gpu["TriggerAuthentication"]["metadata"]["name"]
    )
    meta = kafka["metadata"]
    assert (meta["consumerGroup"], meta["topic"]) == (trigger.group_id, broker.topic)
    assert meta["bootstrapServers"] == broker.bootstrap_servers
    assert int(meta["lagThreshold"]) == lag_threshold(config) == 4 * config.batching.max_batch_size
    # The GPU variant asks for the GPU, and lands where the Service lands; the CPU one does not.
    service = yaml.safe_load((ROOT / "knative" / f"service-{name}.yaml").read_text())["spec"]["template"]["spec"]
    pod = gpu["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["onnxfn", "worker", name, "--eventing", "/etc/onnxfn/eventing"]
    assert container["resources"] == service["containers"][0]["resources"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"] == service["tolerations"] and pod["nodeSelector"] == service["nodeSelector"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "512Mi"}} in pod["volumes"]
    cpu_pod = cpu["Deployment"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"] and "tolerations" not in cpu_pod
    env = {e["name"]: e for e in container["env"]}
    assert (
        env["ONNXFN_PROVIDERS"]["value"] == "cuda"
        and env["KAFKA_BOOTSTRAP_SERVERS"]["value"] == meta["bootstrapServers"]
    )
    # The worker and KEDA read the same Secret, under KEDA's parameter names.
    auth = {r["parameter"]: r for r in gpu["TriggerAuthentication"]["spec"]["secretTargetRef"]}
    assert {"sasl", "username", "password", "tls", "ca"} <= set(auth)
    for parameter, ref in auth.items():
        assert env[f"KAFKA_{parameter.upper()}"]["valueFrom"]["secretKeyRef"]["key"] == ref["key"]


def test_the_configmap_carries_what_the_worker_reads(tmp_path: Path) -> None:
    """The mounted eventing YAML gives the worker in the pod the same plan as here."""
    docs = _docs(ROOT / "workers" / "worker-embed.yaml")
    for file, text in docs["ConfigMap"]["data"].items():
        (tmp_path / file).write_text(text)
    in_pod = WorkerPlan.of(spec.load(tmp_path), "embed")
    here = WorkerPlan.of(spec.load(ROOT / "eventing", services=function_names()), "embed")
    assert in_pod == here


def test_keda_auth_parameters_become_librdkafka_settings() -> None:
    env = {
        "KAFKA_SASL": "scram_sha512",
        "KAFKA_USERNAME": "u",
        "KAFKA_PASSWORD": "p",
        "KAFKA_TLS": "enable",
        "KAFKA_CA": "PEM",
    }
    assert keda_auth_settings(env) == {
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p",
        "security.protocol": "SASL_SSL",
        "ssl.ca.pem": "PEM",
    }
    assert keda_auth_settings({"KAFKA_SASL": "plaintext"})["security.protocol"] == "SASL_PLAINTEXT"
    assert keda_auth_settings({"KAFKA_TLS": "enable"}) == {"security.protocol": "SSL"}
    assert keda_auth_settings({"KAFKA_SASL": "none", "KAFKA_TLS": "disable"}) == {}
    # ONNXFN_KAFKA_* still overrides any property.
    assert (
        client_settings({"KAFKA_TLS": "enable", "ONNXFN_KAFKA_SECURITY_PROTOCOL": "SSL"})["security.protocol"] == "SSL"
    )
    with pytest.raises(ValueError, match="KAFKA_SASL='gss'"):
        keda_auth_settings({"KAFKA_SASL": "gss"})
    with pytest.raises(ValueError, match="KAFKA_TLS='yes'"):
        keda_auth_settings({"KAFKA_TLS": "yes"})
