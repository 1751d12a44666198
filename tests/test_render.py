"""`onnxfn render`: the committed knative/ is exactly what the configs render, and what they render."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

import pytest
import yaml

from shared import render
from shared.contract import Batching, FunctionConfig, Scaling, function_names, load_handler
from shared.traffic import update_file


def _config(**changes: object) -> FunctionConfig:
    base = FunctionConfig(
        name="toy",
        accepts=("dev.toy.request",),
        result_types=("dev.toy.result",),
        model_file="toy/3/model.onnx",
        model_version="3",
        batching=Batching(max_batch_size=8),
        scaling=Scaling(max_scale=5, timeout_seconds=40, retention_period="30s"),
        workers=3,
        concurrency=4,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_committed_knative_matches_render() -> None:
    files = render.render_all(render.KNATIVE_DIR, func_path=render.FUNC_YAML)
    for path, text in files.items():
        assert path.exists(), f"{path} missing: run `onnxfn render`"
        assert path.read_text() == text, f"{path} differs from `onnxfn render`: run it and commit"
    committed = {p for p in render.KNATIVE_DIR.rglob("*.yaml")}
    assert committed == set(files) - {render.FUNC_YAML}, "knative/ holds files render does not produce"


def test_check_flags_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(out=tmp_path, image=render.IMAGE, check=True)
    assert render.run(args) == 1
    assert render.run(argparse.Namespace(out=tmp_path, image=render.IMAGE, check=False)) == 0
    assert render.run(args) == 0
    target = tmp_path / f"service-{function_names()[0]}.yaml"
    target.write_text(target.read_text().replace("containerConcurrency:", "containerConcurrency: 1 #"))
    assert render.run(args) == 1
    assert "differs" in capsys.readouterr().err


def test_plan_derives_numbers_from_workers_concurrency_and_batch() -> None:
    gpu = render.plan(_config(), render.GPU)
    assert gpu.container_concurrency == 3 * 4
    assert gpu.target == 3 * min(4, 8)
    assert gpu.utilization == render.GPU.utilization
    assert gpu.timeout_s == render.GPU.cold_start_s + 40
    assert gpu.graceful_s == 40 < gpu.timeout_s - render.DRAIN_S
    small_batch = render.plan(_config(batching=Batching(max_batch_size=2)), render.CPU)
    assert (small_batch.container_concurrency, small_batch.target) == (12, 6)
    with pytest.raises(ValueError, match="max-revision-timeout"):
        render.plan(_config(scaling=Scaling(timeout_seconds=590)), render.GPU)


def test_service_shape_for_gpu_and_cpu() -> None:
    config = _config()
    gpu = render.service(config, render.GPU, render.GPU)
    cpu = render.service(config, render.CPU, render.GPU)
    template = gpu["spec"]["template"]
    assert template["metadata"]["name"] == "toy-v3"
    assert cpu["spec"]["template"]["metadata"]["name"] == "toy-v3-cpu"
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/max-scale"] == "5"
    assert annotations["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] == "30s"
    assert "annotations" not in gpu["metadata"]
    (container,) = template["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["memory"] == Scaling().gpu_memory
    assert container["image"] == f"{render.IMAGE}:gpu"
    assert container["ports"] == [{"name": "http1", "containerPort": render.USER_PORT}]
    assert container["securityContext"]["runAsNonRoot"] is True
    # a read-only root; what the server writes goes to a sized emptyDir at /tmp
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert template["spec"]["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": render.TMP_SIZE}}]
    (cpu_container,) = cpu["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert gpu["spec"]["traffic"] == render.default_traffic("toy-v3")


def test_variants_per_function() -> None:
    assert [v.name for _, v, _ in render.variants(_config())] == ["gpu", "cpu"]
    assert [(p, v.name) for p, v, _ in render.variants(_config(model_file=None))] == [("service-toy.yaml", "cpu")]


def test_rendered_text_carries_the_reasoning() -> None:
    config = _config()
    text = render.service_text(config, render.GPU, render.GPU, render.service(config, render.GPU, render.GPU))
    lines = text.splitlines()
    for key in ("containerConcurrency:", "autoscaling.knative.dev/target:", "timeoutSeconds:"):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(key))
        assert lines[at - 1].strip().startswith("#"), f"no reasoning above {key}"
    assert "3 workers x 4 requests each = 12" in text
    assert yaml.safe_load(text) == render.service(config, render.GPU, render.GPU)


def test_render_keeps_a_committed_traffic_block(tmp_path: Path) -> None:
    name = next(n for n in function_names() if load_handler(n).config.model_file)
    render.run(argparse.Namespace(out=tmp_path, image=render.IMAGE, check=False))
    path = tmp_path / f"service-{name}.yaml"
    path.write_text(update_file(path, [f"{name}-v1=90", f"{name}-v2=10"], [], []))
    assert render.run(argparse.Namespace(out=tmp_path, image=render.IMAGE, check=True)) == 0
    traffic = yaml.safe_load(path.read_text())["spec"]["traffic"]
    assert [t.get("percent") for t in traffic] == [90, 0, 10]


def test_bad_revision_name_is_refused() -> None:
    with pytest.raises(ValueError, match="DNS-1035"):
        render.revision_name(_config(model_version="1.2"), render.GPU, render.GPU)


def test_replace_traffic_requires_a_rendered_file() -> None:
    with pytest.raises(ValueError, match=r"no spec\.traffic"):
        render.replace_traffic("kind: Service\n", [])


def test_func_yaml_follows_the_func_schema_facts() -> None:
    """knative.md 5.1-5.3: required keys, name pattern, enums, scale/resources keys, no autoscaling annotations."""
    doc = yaml.safe_load(render.FUNC_YAML.read_text())
    assert {"specVersion", "created"} <= set(doc)
    assert doc["specVersion"] == "0.36.0" and isinstance(doc["created"], datetime.datetime)
    assert render.DNS_LABEL.match(doc["name"]) and doc["runtime"] == "python" and doc["invoke"] == "cloudevent"
    deploy = doc["deploy"]
    assert not any(k.startswith("autoscaling.knative.dev/") for k in deploy.get("annotations", {}))
    scale = deploy["options"]["scale"]
    assert set(scale) <= {"min", "max", "metric", "target", "utilization"}
    assert scale["metric"] in ("concurrency", "rps") and scale["target"] >= 0.01 and 1 <= scale["utilization"] <= 100
    assert 0 <= scale["min"] <= scale["max"]
    resources = deploy["options"]["resources"]
    assert set(resources["limits"]) <= {"cpu", "memory", "concurrency"}
    assert set(resources["requests"]) <= {"cpu", "memory"}
    envs = {e["name"]: e["value"] for e in doc["run"]["envs"]}
    config = load_handler(doc["name"]).config
    assert envs["ONNXFN_FUNCTION"] == doc["name"]
    assert resources["limits"]["concurrency"] == int(envs["ONNXFN_WORKERS"]) * config.concurrency
    assert int(envs["ONNXFN_WORKERS"]) == config.workers
    assert "created: 2026" in render.FUNC_YAML.read_text(), "created must be an unquoted timestamp"
