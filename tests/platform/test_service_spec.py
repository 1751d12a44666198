"""Reading Service files as the platform does: which variant is served, revisions from the traffic
block, Knative's defaults and annotation spellings, durations and CPU quantities, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared import service_files
from shared.config import PROJECT_ROOT
from shared.platform import spec
from shared.service_files import SpecError, parse_go_duration

KNATIVE = PROJECT_ROOT / "knative"

MINIMAL = """
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: fn}
spec:
  template:
    metadata:
      name: fn-v3
      annotations: {ANNOTATIONS}
    spec:
      containers:
        - image: x
          env: [{name: ONNXFN_FUNCTION, value: mypkg.fn}, {name: ONNXFN_MODEL_VERSION, value: '7'}]
  TRAFFIC
"""


def _service(directory: Path, annotations: str = "{}", traffic: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "service-fn.yaml"
    path.write_text(MINIMAL.replace("{ANNOTATIONS}", annotations).replace("TRAFFIC", traffic))
    return path


def test_the_platform_serves_the_cpu_variant_and_traffic_edits_both() -> None:
    served = service_files.served(KNATIVE)
    assert served["digits"].path == KNATIVE / "cpu" / "service-digits.yaml" and served["digits"].cpu
    assert {f.variant for f in service_files.variants(KNATIVE, "digits")} == {"default", "cpu"}
    assert served["postprocess"].path == KNATIVE / "service-postprocess.yaml"  # no model: one variant


def test_go_durations_and_cpu_quantities() -> None:
    assert parse_go_duration("1m30s") == 90.0 and parse_go_duration("500ms") == 0.5 and parse_go_duration(45) == 45
    assert parse_go_duration("2") == 2.0
    for bad in ("5 s", "1x", "s", "PT5S"):
        with pytest.raises(SpecError, match="not a duration"):
            parse_go_duration(bad)
    assert spec.parse_cpu("500m") == 0.5 and spec.parse_cpu("2") == 2.0 and spec.parse_cpu(1) == 1.0


def test_committed_digits_revisions_and_scaling(tmp_path: Path) -> None:
    shutil.copy(KNATIVE / "cpu" / "service-digits.yaml", tmp_path / "service-digits.yaml")
    (digits,) = spec.load_services(tmp_path).values()
    revision = digits.revisions[digits.latest]
    assert (revision.name, revision.model_version, revision.function) == ("digits-v1-cpu", "1", "digits")
    assert revision.container_concurrency == 32 and revision.target == 32 and revision.utilization == 70
    assert revision.target_value == pytest.approx(22.4) and revision.wanted(23) == 2 and revision.wanted(0) == 0
    assert revision.retention_s == 60 and revision.cpu == 2.0 and revision.timeout_s == 75
    env = revision.process_env()
    assert env["K_REVISION"] == "digits-v1-cpu" and env["ONNXFN_MODEL_VERSION"] == "1"


def test_defaults_legacy_annotations_and_versions_without_importing_the_function(tmp_path: Path) -> None:
    traffic = (
        "traffic: [{revisionName: fn-v3, percent: 80}, {revisionName: fn-v2-cpu, percent: 20, tag: old},"
        " {revisionName: fn-canary, percent: 0, tag: next}]"
    )
    path = _service(tmp_path, "{autoscaling.knative.dev/minScale: '1', autoscaling.knative.dev/window: 2m}", traffic)
    (service,) = spec.load_services(tmp_path, ["fn"]).values()
    assert service.path == path and service.splits == [("fn-v3", 80), ("fn-v2-cpu", 20)]
    assert service.tags == {"old": "fn-v2-cpu", "next": "fn-canary"}
    latest, older, canary = (service.revisions[n] for n in ("fn-v3", "fn-v2-cpu", "fn-canary"))
    # The function `mypkg.fn` does not exist here: the platform reads only the YAML.
    assert latest.function == "mypkg.fn" and latest.model_version == "3"  # from the revision's name
    assert older.model_version == "2" and canary.model_version == "7"  # name, else the container's env
    assert latest.min_scale == 1 and latest.stable_window_s == 120 and latest.max_scale == 0
    assert latest.container_concurrency == 0 and latest.target is None and latest.utilization == 70
    assert latest.target_value == 70 and latest.timeout_s == 300 and latest.cpu == 1.0


@pytest.mark.parametrize(
    ("annotations", "traffic", "message"),
    [
        ("{}", "traffic: [{latestRevision: true, percent: 90}]", "traffic percents sum to 90, want 100"),
        ("{autoscaling.knative.dev/window: soon}", "", "revision fn-v3: 'soon' is not a duration"),
        ("{autoscaling.knative.dev/min-scale: many}", "", "revision fn-v3: invalid literal"),
    ],
)
def test_a_wrong_service_file_names_file_and_field(
    tmp_path: Path, annotations: str, traffic: str, message: str
) -> None:
    path = _service(tmp_path, annotations, traffic)
    with pytest.raises(SpecError, match=message) as caught:
        spec.load_services(tmp_path)
    assert str(path) in str(caught.value)


def test_unreadable_and_missing_service_files(tmp_path: Path) -> None:
    (tmp_path / "service-broken.yaml").write_text("kind: Service\nmetadata: {name: [\n")
    with pytest.raises(SpecError, match=r"service-broken\.yaml: not readable YAML"):
        service_files.served(tmp_path)
    (tmp_path / "service-broken.yaml").write_text("kind: Service\nmetadata: {name: Bad_Name}\nspec: {template: {}}\n")
    with pytest.raises(SpecError, match="'Bad_Name' is not a DNS-1035 label"):
        service_files.served(tmp_path)
    (tmp_path / "service-broken.yaml").write_text("")  # caught between truncate and write
    with pytest.raises(SpecError, match=r"service-broken\.yaml: empty file"):
        service_files.served(tmp_path)
    (tmp_path / "service-broken.yaml").unlink()
    with pytest.raises(SpecError, match="no Service file for nothere"):
        service_files.served(tmp_path, ["nothere"])
