"""Render one Knative Service per function into `knative/` from the function's own config.

Layout (one image for every function; `ONNXFN_FUNCTION` picks the function):

    knative/service-<fn>.yaml         default variant: GPU for a function with a model, else CPU
    knative/cpu/service-<fn>.yaml     CPU variant of a model function (same Service name: apply one)
    knative/config-features-patch.yaml    the `config-features` flags the GPU variant needs
    knative/config-deployment-patch.yaml  `pod-is-always-schedulable` for GPU-autoscaled clusters
    func.yaml                         Knative Functions metadata (digits, CPU variant; see func_yaml)

`spec.traffic` of a committed Service belongs to `onnxfn traffic` (GitOps for `kn service update
--traffic/--tag/--untag`): rendering keeps it, and writes a default block only for a new file.
`--check` exits 1 when a committed file differs from what would be rendered.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shared import service_files
from shared.service_files import AUTOSCALING, DNS_LABEL, KNATIVE_DIR

if TYPE_CHECKING:
    from shared.contract import FunctionConfig

# The container's start command: the Dockerfile's CMD; the function comes from ONNXFN_FUNCTION.
CONTAINER_COMMAND: list[str] = ["onnxfn", "serve"]
IMAGE = "ghcr.io/onnxfn/onnxfn"
USER_PORT = 8080
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# queue-proxy's preStop drain (Knative runtime contract) and the slack left for the process to exit after it.
DRAIN_S = 30
EXIT_MARGIN_S = 10
MAX_REVISION_TIMEOUT_S = 600


@dataclass(frozen=True)
class Variant:
    """What differs between the GPU and the CPU deployment of one function."""

    name: str
    gpu: bool
    providers: str  # ONNXFN_PROVIDERS
    utilization: int  # target-utilization-percentage
    cold_start_s: int  # allowance added to the request budget for timeoutSeconds
    startup_budget_s: int  # startupProbe period x failureThreshold
    progress_deadline_s: int  # serving.knative.dev/progress-deadline (> pull + startup)


GPU = Variant("gpu", True, "cuda", 90, 90, 300, 900)
CPU = Variant("cpu", False, "cpu", 70, 45, 120, 600)
STARTUP_PERIOD_S = 2


@dataclass(frozen=True)
class Plan:
    """The serving numbers of one function in one variant, and why."""

    container_concurrency: int
    target: int
    utilization: int
    timeout_s: int
    graceful_s: int
    reasons: dict[str, list[str]]


def plan(config: FunctionConfig, variant: Variant) -> Plan:
    """Derive concurrency, autoscaling target and timeouts from what one instance holds."""
    workers, per_worker, batch = config.workers, config.concurrency, config.batching.max_batch_size
    concurrency = workers * per_worker
    target = workers * min(per_worker, batch)
    request_s = config.scaling.timeout_seconds
    timeout = variant.cold_start_s + request_s
    if timeout > MAX_REVISION_TIMEOUT_S:
        raise ValueError(f"{config.name}: timeoutSeconds {timeout} > max-revision-timeout-seconds 600")
    graceful = request_s
    if graceful >= timeout - DRAIN_S:
        raise ValueError(f"{config.name}: graceful timeout {graceful} s is not under timeoutSeconds - {DRAIN_S}")
    headroom = (
        [
            "a full batch costs about as much as one item on a GPU, so pods run nearly",
            "full; queue-proxy's queue (10 x containerConcurrency) absorbs bursts.",
        ]
        if variant.gpu
        else ["on CPU a batch costs in proportion to its size: keep Knative's default headroom."]
    )
    startup = "pod start, onnxruntime session, model load" if config.model_file else "pod start, imports"
    reasons = {
        "containerConcurrency": [
            f"{workers} worker{'s' if workers != 1 else ''} x {per_worker} requests each = {concurrency} requests"
            " one pod holds;",
            "more would queue inside the pod, invisible to the autoscaler and to queue-proxy.",
        ],
        "target": [
            f"per worker, min(concurrency {per_worker}, max_batch_size {batch}) in-flight requests fill a batch;",
            f"x {workers} workers = {target} (<= containerConcurrency, which caps the decider's total).",
        ],
        "utilization": [f"{variant.utilization} %: {headroom[0]}", *headroom[1:]],
        "timeout": [
            f"{variant.cold_start_s} s cold start ({startup}) + {request_s} s for the request = {timeout} s;",
            "the activator applies it to a request waiting for a cold pod, and it is the pod's grace period.",
        ],
        "graceful": [
            f"gunicorn graceful timeout {graceful} s (the request budget) < timeoutSeconds {timeout}"
            f" - {DRAIN_S} s queue-proxy drain.",
        ],
    }
    return Plan(concurrency, target, variant.utilization, timeout, graceful, reasons)


def revision_name(config: FunctionConfig, variant: Variant, default: Variant) -> str:
    """`<fn>-v<model version>`; a non-default variant adds `-<variant>` so switching makes a new revision."""
    name = f"{config.name}-v{config.model_version}"
    if variant != default:
        name += f"-{variant.name}"
    if len(name) > 63 or not DNS_LABEL.match(name):
        raise ValueError(f"revision name {name!r} is not a DNS-1035 label")
    return name


def default_traffic(revision: str) -> list[dict[str, Any]]:
    """All traffic pinned to this revision (tag `current`), plus a `latest` tag URL for canaries."""
    return [
        {"tag": "current", "revisionName": revision, "latestRevision": False, "percent": 100},
        {"tag": "latest", "latestRevision": True, "percent": 0},
    ]


def _labels(config: FunctionConfig, variant: Variant) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": config.name,
        "app.kubernetes.io/part-of": "onnxfn",
        "onnxfn.dev/variant": variant.name,
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": USER_PORT},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


# The root filesystem is read-only; what the server writes (Prometheus' multiprocess files, the
# optimised-model cache, the engine's socket, gunicorn's heartbeats) goes to /tmp, an emptyDir
# (enabled in Knative by default: kubernetes.podspec-volumes-emptydir). The cache holds one
# optimised copy of the model (embed: ~90 MB).
TMP_SIZE = "512Mi"
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def tmp_volume() -> dict[str, Any]:
    return {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}}


def service(
    config: FunctionConfig,
    variant: Variant,
    default: Variant,
    image: str = IMAGE,
    traffic: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The Knative Service manifest of one function in one variant."""
    numbers = plan(config, variant)
    scaling = config.scaling
    revision = revision_name(config, variant, default)
    annotations = {
        f"{AUTOSCALING}class": "kpa.autoscaling.knative.dev",
        f"{AUTOSCALING}metric": "concurrency",
        f"{AUTOSCALING}target": str(numbers.target),
        f"{AUTOSCALING}target-utilization-percentage": str(numbers.utilization),
        f"{AUTOSCALING}min-scale": str(scaling.min_scale),
        f"{AUTOSCALING}max-scale": str(scaling.max_scale),
        f"{AUTOSCALING}initial-scale": str(scaling.initial_scale),
        f"{AUTOSCALING}scale-to-zero-pod-retention-period": scaling.retention_period,
        "serving.knative.dev/progress-deadline": f"{variant.progress_deadline_s}s",
    }
    env = {
        "ONNXFN_FUNCTION": config.name,
        "ONNXFN_PROVIDERS": variant.providers,
        "ONNXFN_WORKERS": str(config.workers),
        "ONNXFN_GRACEFUL_TIMEOUT": str(numbers.graceful_s),
    }
    memory = scaling.gpu_memory if variant.gpu else scaling.memory
    resources: dict[str, Any] = {
        "requests": {"cpu": scaling.cpu, "memory": memory},
        "limits": {"memory": memory},
    }
    container: dict[str, Any] = {
        "name": "function",
        "image": f"{image}:{variant.name}",
        "ports": [{"name": "http1", "containerPort": USER_PORT}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": resources,
        # No periodSeconds: queue-proxy then probes every 50 ms, so a cold pod takes traffic at once.
        "readinessProbe": {"httpGet": {"path": "/health/readiness"}},
        "startupProbe": _probe("/health/readiness", STARTUP_PERIOD_S, variant.startup_budget_s // STARTUP_PERIOD_S),
        "livenessProbe": _probe("/health/liveness", 10, 3),
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [dict(TMP_MOUNT)],
    }
    pod: dict[str, Any] = {
        "containerConcurrency": numbers.container_concurrency,
        "timeoutSeconds": numbers.timeout_s,
    }
    if variant.gpu:
        resources["limits"][GPU_RESOURCE] = 1
        pod["nodeSelector"] = dict(GPU_NODE_SELECTOR)
        pod["tolerations"] = [dict(GPU_TOLERATION)]
    pod["containers"] = [container]
    pod["volumes"] = [tmp_volume()]
    labels = _labels(config, variant)
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {
            "name": config.name,
            # Reached by Broker triggers inside the cluster only; tag URLs are cluster-local too.
            "labels": {**labels, "networking.knative.dev/visibility": "cluster-local"},
        },
        "spec": {
            "template": {
                "metadata": {
                    "name": revision,
                    "labels": {**labels, "onnxfn.dev/model-version": config.model_version},
                    "annotations": annotations,
                },
                "spec": pod,
            },
            "traffic": traffic if traffic is not None else default_traffic(revision),
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style with sequences indented under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text_block(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    """Multi-line strings (files in a ConfigMap) as literal `|` blocks."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _text_block)


def dump(doc: Any) -> str:
    """YAML text in the project's manifest style."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)


def _with_comments(text: str, comments: Mapping[str, list[str]]) -> str:
    """Put comment lines above the first line that starts (indent aside) with each of `comments`' keys."""
    pending = dict(comments)
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        for key in list(pending):
            if stripped.startswith(key):
                indent = line[: len(line) - len(stripped)]
                out += [f"{indent}# {comment}\n" for comment in pending.pop(key)]
        out.append(line)
    if pending:
        raise ValueError(f"no line for comment keys {sorted(pending)}")
    return "".join(out)


def traffic_text(traffic: list[dict[str, Any]]) -> str:
    """The `spec.traffic` block as it appears at the end of a rendered Service file."""
    return dump({"spec": {"traffic": traffic}}).split("\n", 1)[1]


def replace_traffic(text: str, traffic: list[dict[str, Any]]) -> str:
    """Swap the trailing `  traffic:` block of a rendered Service file, keeping everything above it."""
    marker = "\n  traffic:"
    at = text.rfind(marker)
    if at < 0:
        raise ValueError("no spec.traffic block at the end of the file (was it written by `onnxfn render`?)")
    return text[: at + 1] + traffic_text(traffic)


def service_text(config: FunctionConfig, variant: Variant, default: Variant, doc: dict[str, Any]) -> str:
    """The commented file text of a rendered Service."""
    numbers = plan(config, variant)
    others = [f"knative/{rel}" for rel, v, _ in variants(config) if v != variant]
    header = [
        f"# Generated by `onnxfn render` from functions/{config.name} (FunctionConfig): edit the config,",
        "# not this file. spec.traffic is kept across renders; change it with `onnxfn traffic`",
        "# (docs/operations.md).",
        f"# Variant: {variant.name}."
        + (f" Apply this file or {others[0]} (same Service), not both." if others else ""),
    ]
    traffic = doc["spec"]["traffic"]
    body = dump({k: v for k, v in doc.items() if k != "spec"})
    body += dump({"spec": {"template": doc["spec"]["template"]}})
    comments = {
        "containerConcurrency:": numbers.reasons["containerConcurrency"],
        f"{AUTOSCALING}target:": numbers.reasons["target"],
        f"{AUTOSCALING}target-utilization-percentage:": numbers.reasons["utilization"],
        "timeoutSeconds:": numbers.reasons["timeout"],
        "- name: ONNXFN_GRACEFUL_TIMEOUT": numbers.reasons["graceful"],
    }
    return "\n".join(header) + "\n" + _with_comments(body, comments) + traffic_text(traffic)


FUNC_YAML = KNATIVE_DIR.parent / "func.yaml"
FUNC_SPEC_VERSION = "0.36.0"
FUNC_CREATED = "2026-01-01T00:00:00Z"
FUNC_FUNCTION = "digits"


def func_yaml(config: FunctionConfig, image: str = IMAGE) -> str:
    """A Knative Functions `func.yaml` for one function: the CPU variant, the one func can express.

    func.yaml has no key for GPU limits, nodeSelector, tolerations or timeoutSeconds, and `func
    deploy` rewrites resources and annotations on every deploy: GPU Services
    are applied from knative/ with kubectl instead. Autoscaling goes in `deploy.options.scale`, never
    in `deploy.annotations` (which func copies onto the Service metadata, where Serving rejects it).
    """
    numbers = plan(config, CPU)
    envs = service(config, CPU, CPU, image)["spec"]["template"]["spec"]["containers"][0]["env"]
    doc = {
        "specVersion": FUNC_SPEC_VERSION,
        "name": config.name,
        "runtime": "python",
        "image": f"{image}:{CPU.name}",
        "created": FUNC_CREATED,
        "invoke": "cloudevent",
        "run": {"envs": envs},
        "deploy": {
            "healthEndpoints": {"liveness": "/health/liveness", "readiness": "/health/readiness"},
            "options": {
                "scale": {
                    "min": config.scaling.min_scale,
                    "max": config.scaling.max_scale,
                    "metric": "concurrency",
                    "target": numbers.target,
                    "utilization": numbers.utilization,
                },
                "resources": {
                    "requests": {"cpu": config.scaling.cpu, "memory": config.scaling.memory},
                    "limits": {"memory": config.scaling.memory, "concurrency": numbers.container_concurrency},
                },
            },
        },
    }
    header = (
        f"# Generated by `onnxfn render` from functions/{config.name}: the CPU Service for `func`.\n"
        "# `func build` ignores the Dockerfile, so deploy the image built from it:\n"
        f"#   func deploy --build=false --image {image}:{CPU.name}\n"
        "# func cannot express GPUs or timeoutSeconds; see docs/operations.md for `kubectl apply -f knative/`.\n"
    )
    # An unquoted YAML timestamp, as func itself writes `created`.
    return header + dump(doc).replace(f"created: '{FUNC_CREATED}'", f"created: {FUNC_CREATED}")


def config_patches() -> dict[str, str]:
    """Cluster ConfigMap patches (relative path -> text) the Services rely on."""
    features = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "config-features", "namespace": "knative-serving"},
        "data": {
            "kubernetes.podspec-nodeselector": "enabled",
            "kubernetes.podspec-tolerations": "enabled",
            "tag-header-based-routing": "enabled",
        },
    }
    deployment = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "config-deployment", "namespace": "knative-serving"},
        "data": {"pod-is-always-schedulable": "true"},
    }
    apply = (
        "# Merge into the live ConfigMap:\n"
        "#   kubectl patch configmap/{} -n knative-serving --type merge --patch-file {}\n"
    )
    return {
        "config-features-patch.yaml": apply.format("config-features", "knative/config-features-patch.yaml")
        + "# nodeSelector, tolerations: GPU variants; tag header: `Knative-Serving-Tag: latest` canaries.\n"
        + dump(features),
        "config-deployment-patch.yaml": apply.format("config-deployment", "knative/config-deployment-patch.yaml")
        + "# Only with a GPU cluster-autoscaler: Pending pods do not mark the revision Unschedulable.\n"
        + dump(deployment),
    }


def variants(config: FunctionConfig) -> list[tuple[str, Variant, Variant]]:
    """(relative path, variant, default variant) of each Service file of a function."""
    if config.model_file is None:
        return [(f"service-{config.name}.yaml", CPU, CPU)]
    return [(f"service-{config.name}.yaml", GPU, GPU), (f"cpu/service-{config.name}.yaml", CPU, GPU)]


def _committed_traffic(path: Path) -> list[dict[str, Any]] | None:
    """The `spec.traffic` of the Service already committed at `path` (kept across renders)."""
    if not path.exists():
        return None
    for file in service_files.read_file(path):
        traffic = file.document["spec"].get("traffic")
        return traffic if isinstance(traffic, list) else None
    return None


def render_all(
    out: Path,
    image: str = IMAGE,
    names: list[str] | None = None,
    func_path: Path | None = None,
    eventing: tuple[Path, Path] | None = None,
) -> dict[Path, str]:
    """Every file `onnxfn render` writes (path -> text): `out`, `func_path` when given, and with
    `eventing` = (eventing folder, workers folder) the workers of its worker Triggers.

    Committed traffic blocks are kept.
    """
    from shared.contract import function_names, load_handler

    files = {out / rel: text for rel, text in config_patches().items()}
    if func_path is not None:
        files[func_path] = func_yaml(load_handler(FUNC_FUNCTION).config, image)
    for name in names if names is not None else function_names():
        config = load_handler(name).config
        for rel, variant, default in variants(config):
            path = out / rel
            doc = service(config, variant, default, image, _committed_traffic(path))
            files[path] = service_text(config, variant, default, doc)
    if eventing is not None:
        from shared.eventing import spec
        from shared.render_worker import worker_files

        eventing_dir, workers_out = eventing
        files.update(worker_files(spec.load(eventing_dir, services=function_names()), eventing_dir, workers_out, image))
    return files


def _diff(files: Mapping[Path, str]) -> Iterator[str]:
    for path, text in files.items():
        if not path.exists():
            yield f"{path}: missing"
        elif path.read_text() != text:
            yield f"{path}: differs from the rendered text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=KNATIVE_DIR, help="output folder (default: knative/)")
    parser.add_argument("--image", default=IMAGE, help=f"image repository, tagged :gpu/:cpu (default {IMAGE})")
    parser.add_argument("--func-yaml", type=Path, default=FUNC_YAML, help="where func.yaml goes (default: top level)")
    parser.add_argument(
        "--eventing", type=Path, default=KNATIVE_DIR.parent / "eventing", help="eventing YAML (its worker Triggers)"
    )
    parser.add_argument(
        "--workers-out", type=Path, default=KNATIVE_DIR.parent / "workers", help="worker Deployments/ScaledObjects"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if committed files differ")


def run(args: argparse.Namespace) -> int:
    eventing = (args.eventing, args.workers_out) if getattr(args, "eventing", None) else None
    files = render_all(args.out, args.image, func_path=getattr(args, "func_yaml", None), eventing=eventing)
    if args.check:
        problems = list(_diff(files))
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `onnxfn render` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    return 0
