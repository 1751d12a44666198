"""Render the cluster shape of a Trigger marked `onnxfn.dev/delivery: worker` into `workers/`.

    workers/worker-<fn>.yaml       default variant (GPU for a model function)
    workers/cpu/worker-<fn>.yaml   CPU variant (same names: apply one)

Each file holds, for the Trigger's namespace:
- a ConfigMap `<fn>-worker-eventing` with the eventing YAML (the worker reads its Trigger, filter,
  broker and dead-letter sink from it, as `onnxfn up` does);
- a Deployment `<fn>-worker` running the function's image with `onnxfn worker <fn>`: the same
  resources, GPU limits, nodeSelector, tolerations and security context as its Knative Service;
  Kafka authentication from the Secret `onnxfn-kafka` (KEDA's key names; optional);
- a KEDA TriggerAuthentication `onnxfn-kafka` reading that Secret, and a ScaledObject scaling the
  Deployment on the Trigger's consumer-group lag: 0 replicas without lag, at most one per partition.

The Knative Service stays for HTTP invokes; Knative does not deliver this Trigger's events (apply the
Trigger without a subscriber change: the worker reads under its consumer group).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import render
from shared.render import GPU_NODE_SELECTOR, GPU_TOLERATION, USER_PORT, Variant

if TYPE_CHECKING:
    from shared.contract import FunctionConfig
    from shared.eventing.spec import EventingSpec, TriggerSpec

EVENTING_MOUNT = "/etc/onnxfn/eventing"
AUTH_SECRET = "onnxfn-kafka"
# KEDA's Kafka authentication parameters, each read from the Secret key of the same name.
AUTH_PARAMETERS = ("sasl", "username", "password", "tls", "ca", "cert", "key")
POLLING_INTERVAL_S = 10
PASSES_PER_REPLICA = 4  # a worker takes up to 4 x max_batch_size records a pass (worker.py)


def lag_threshold(config: FunctionConfig) -> int:
    """Records of lag one replica is there for: what it takes in one pass."""
    return PASSES_PER_REPLICA * config.batching.max_batch_size


def _eventing_config_map(name: str, namespace: str, eventing_dir: Path) -> dict[str, Any]:
    files = {path.name: path.read_text() for path in sorted(eventing_dir.glob("*.yaml"))}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": files,
    }


def deployment(
    config: FunctionConfig, trigger: TriggerSpec, variant: Variant, image: str, bootstrap: str
) -> dict[str, Any]:
    """The worker's Deployment (no `replicas`: the ScaledObject owns it)."""
    service = render.service(config, variant, variant, image)
    pod = service["spec"]["template"]["spec"]
    function = pod["containers"][0]
    name = f"{config.name}-worker"
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": "worker",  # observability/podmonitors.yaml scrapes these
        "app.kubernetes.io/part-of": "onnxfn",
        "onnxfn.dev/variant": variant.name,
    }
    numbers = render.plan(config, variant)
    env = [e for e in function["env"] if e["name"] in ("ONNXFN_FUNCTION", "ONNXFN_PROVIDERS")]
    env.append({"name": "KAFKA_BOOTSTRAP_SERVERS", "value": bootstrap})
    env += [
        {
            "name": f"KAFKA_{param.upper()}",
            "valueFrom": {"secretKeyRef": {"name": AUTH_SECRET, "key": param, "optional": True}},
        }
        for param in AUTH_PARAMETERS
    ]
    container = {
        "name": "worker",
        "image": function["image"],
        "command": ["onnxfn", "worker", config.name, "--eventing", EVENTING_MOUNT],
        "ports": [{"name": "http", "containerPort": USER_PORT}],
        "env": env,
        "resources": function["resources"],
        "readinessProbe": {"httpGet": {"path": "/health/readiness", "port": USER_PORT}, "periodSeconds": 2},
        "startupProbe": function["startupProbe"],
        "livenessProbe": function["livenessProbe"],
        "securityContext": function["securityContext"],
        "volumeMounts": [
            {"name": "eventing", "mountPath": EVENTING_MOUNT, "readOnly": True},
            *function["volumeMounts"],
        ],
    }
    spec: dict[str, Any] = {
        # SIGTERM: finish the batch, wait for acknowledgements, commit (worker.py); then the slack.
        "terminationGracePeriodSeconds": numbers.graceful_s + render.EXIT_MARGIN_S,
        "containers": [container],
        "volumes": [{"name": "eventing", "configMap": {"name": f"{name}-eventing"}}, *pod["volumes"]],
    }
    if variant.gpu:
        spec["nodeSelector"] = dict(GPU_NODE_SELECTOR)
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": trigger.namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def trigger_authentication(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": AUTH_SECRET, "namespace": namespace},
        "spec": {"secretTargetRef": [{"parameter": p, "name": AUTH_SECRET, "key": p} for p in AUTH_PARAMETERS]},
    }


def scaled_object(
    config: FunctionConfig, trigger: TriggerSpec, topic: str, partitions: int, bootstrap: str, cooldown_s: float
) -> dict[str, Any]:
    """KEDA's `kafka` trigger on the Trigger's consumer group: one replica per `lag_threshold`
    records of lag, none without lag, never more than the topic's partitions (an idle consumer)."""
    name = f"{config.name}-worker"
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": trigger.namespace},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": 0,
            "maxReplicaCount": partitions,
            "pollingInterval": POLLING_INTERVAL_S,
            "cooldownPeriod": round(cooldown_s),
            "triggers": [
                {
                    "type": "kafka",
                    "metadata": {
                        "bootstrapServers": bootstrap,
                        "consumerGroup": trigger.group_id,
                        "topic": topic,
                        "lagThreshold": str(lag_threshold(config)),
                        "activationLagThreshold": "0",
                        "offsetResetPolicy": "earliest",
                    },
                    "authenticationRef": {"name": AUTH_SECRET},
                }
            ],
        },
    }


def worker_text(
    config: FunctionConfig, spec: EventingSpec, trigger: TriggerSpec, variant: Variant, image: str, eventing_dir: Path
) -> str:
    """The commented multi-document file of one worker in one variant."""
    from shared.eventing.worker_scaler import idle_window_s

    broker = spec.brokers[f"{trigger.namespace}/{trigger.broker}"]
    bootstrap = broker.bootstrap_servers
    if not bootstrap:
        raise ValueError(f"Trigger/{trigger.name}: its Broker's ConfigMap has no bootstrap.servers for the worker")
    name = f"{config.name}-worker"
    cooldown = idle_window_s(config)
    header = [
        f"# Generated by `onnxfn render` from functions/{config.name} and Trigger/{trigger.name}"
        " (onnxfn.dev/delivery: worker): edit those, not this file.",
        f"# Variant: {variant.name}. `kubectl apply -f` this file or the other variant's, not both; needs KEDA 2.x.",
        f"# Kafka auth: a Secret {AUTH_SECRET} with KEDA's keys ({', '.join(AUTH_PARAMETERS)}), at least",
        f"#   kubectl create secret generic {AUTH_SECRET} --from-literal=sasl=none --from-literal=tls=disable",
    ]
    comments = {
        "maxReplicaCount:": [f"one consumer per partition of {broker.topic} ({broker.partitions}); more would idle."],
        "lagThreshold:": [
            f"{PASSES_PER_REPLICA} x max_batch_size {config.batching.max_batch_size}: what one replica takes a pass."
        ],
        "cooldownPeriod:": [f"the function's idle window ({cooldown:g} s), as `onnxfn up` uses it."],
    }
    docs = [
        render.dump(_eventing_config_map(f"{name}-eventing", trigger.namespace, eventing_dir)),
        render.dump(deployment(config, trigger, variant, image, bootstrap)),
        render.dump(trigger_authentication(trigger.namespace)),
        render._with_comments(
            render.dump(scaled_object(config, trigger, broker.topic, broker.partitions, bootstrap, cooldown)),
            comments,
        ),
    ]
    return "\n".join(header) + "\n" + "---\n".join(docs)


def worker_files(spec: EventingSpec, eventing_dir: Path, out: Path, image: str) -> dict[Path, str]:
    """Path -> text of every worker file (none when no Trigger is a worker)."""
    from shared.contract import load_handler

    files: dict[Path, str] = {}
    for trigger in spec.triggers:
        if not trigger.worker or trigger.subscriber.ref is None:
            continue
        config = load_handler(trigger.subscriber.ref.name).config
        for rel, variant, _default in render.variants(config):
            path = out / rel.replace("service-", "worker-")
            files[path] = worker_text(config, spec, trigger, variant, image, eventing_dir)
    return files
