"""observability/: the PodMonitors and the PrometheusRule are valid Prometheus Operator resources,
the rules pass promtool, and every metric the alerts and the Grafana dashboard query is one the
processes export (read from a real function's /metrics and a worker's registry; PromQL parsed
with promql-parser)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from knative_crds import validate_manifest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.config import PROJECT_ROOT
from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)
OBSERVABILITY = PROJECT_ROOT / "observability"
CRDS = Path(os.environ.get("PROMETHEUS_OPERATOR_CRDS_DIR", Path(__file__).parent / "fixtures" / "prometheus-operator"))
PROMETHEUS_BUILTIN = {"up"}  # what Prometheus itself records for every target


def _documents(name: str) -> list[Any]:
    return list(yaml.safe_load_all((OBSERVABILITY / name).read_text()))


def _rule_expressions() -> dict[str, str]:
    rule = _documents("prometheusrule.yaml")[0]
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def _dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return {f"{p['title']} {t['refId']}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}


def _metric_names(expr: str) -> set[str]:
    import promql_parser

    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def test_podmonitors_and_the_rule_are_valid_prometheus_operator_resources() -> None:
    docs = _documents("podmonitors.yaml") + _documents("prometheusrule.yaml")
    assert [d["kind"] for d in docs] == ["PodMonitor", "PodMonitor", "PrometheusRule"]
    errors = [e for doc in docs for e in validate_manifest(doc, CRDS)]
    assert errors == []
    broken = {**docs[0], "spec": {**docs[0]["spec"], "podMetricsEndpoints": [{"port": 8080}]}}
    assert any("port" in e for e in validate_manifest(broken, CRDS))  # the schema does check


def test_worker_pods_carry_the_labels_their_podmonitor_selects() -> None:
    monitor = _documents("podmonitors.yaml")[1]["spec"]
    for path in (PROJECT_ROOT / "workers").rglob("worker-*.yaml"):
        deployment = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Deployment")
        pod = deployment["spec"]["template"]
        assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), path
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert monitor["podMetricsEndpoints"][0]["port"] in ports, path


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (make test installs Debian's prometheus)")
def test_the_alert_rules_pass_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _documents("prometheusrule.yaml")[0]["spec"]["groups"]}))
    done = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 4 rules found" in done.stdout
    rules.write_text(
        rules.read_text().replace("rate(onnxfn_worker_lag", "rate(onnxfn_worker_lag").replace(" > 10000", " >> 1")
    )
    assert subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True).returncode != 0


def _exported(model_dir: Path) -> set[str]:
    """Sample names a digits function (after one event) and a digits worker export."""
    from functions.digits.func import EXAMPLE_IMAGE
    from shared.config import Settings
    from shared.contract import load_handler
    from shared.eventing.worker import WorkerMetrics
    from shared.metrics import Metrics
    from shared.pipeline import Pipeline

    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": "1"}
    with FunctionProcess("digits", env=env) as server:
        server.wait_ready()
        headers = {"ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/tests",
                   "ce-type": "dev.onnxfn.digits.request", "content-type": "application/json"}  # fmt: skip
        body = json.dumps({"image": [list(row) for row in EXAMPLE_IMAGE]})
        assert requests.post(server.url, data=body, headers=headers, timeout=10).status_code == 200
        text = requests.get(server.url + "/metrics", timeout=10).text
    pipeline = Pipeline(load_handler("digits"), Settings.from_env(env, function="digits"), Metrics("digits"))
    worker = WorkerMetrics(pipeline)
    worker.lag.labels("digits", "0").set(0)  # a partition's lag, as the worker sets it once assigned
    text += generate_latest(worker.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_alerts_and_the_dashboard_query_is_exported(model_dir: Path) -> None:
    exported = _exported(model_dir) | PROMETHEUS_BUILTIN
    queries = {**_rule_expressions(), **_dashboard_expressions()}
    assert len(queries) >= 12
    missing = {name: sorted(_metric_names(expr) - exported) for name, expr in queries.items()}
    assert {k: v for k, v in missing.items() if v} == {}
    assert "onnxfn_startup_seconds_bucket" in exported and "onnxfn_worker_lag" in exported
