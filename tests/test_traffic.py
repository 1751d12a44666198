"""`onnxfn traffic` changes spec.traffic exactly as the documented `kn service update` flags do."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import render, traffic
from shared.config import PROJECT_ROOT
from shared.traffic import TrafficError, apply_traffic

OPERATIONS = PROJECT_ROOT / "docs" / "operations.md"


def _svc(targets: list[dict[str, Any]], template: str = "digits-v2") -> dict[str, Any]:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "digits"},
        "spec": {"template": {"metadata": {"name": template}}, "traffic": targets},
    }


def _kn(command: str) -> tuple[list[str], list[str], list[str]]:
    """The --traffic/--tag/--untag values of a `kn service update digits ...` command line."""
    words = shlex.split(command)
    assert words[:4] == ["kn", "service", "update", "digits"]
    found: dict[str, list[str]] = {"--traffic": [], "--tag": [], "--untag": []}
    for flag, value in zip(words[4::2], words[5::2], strict=True):
        found[flag].append(value)
    return found["--traffic"], found["--tag"], found["--untag"]


V1 = render.default_traffic("digits-v1")
# (the kn command in docs/operations.md, the traffic block it produces from the previous step's)
CANARY = [
    (
        "kn service update digits --tag digits-v2=candidate",
        [*V1, {"tag": "candidate", "revisionName": "digits-v2", "latestRevision": False, "percent": 0}],
    ),
    (
        "kn service update digits --traffic current=90 --traffic candidate=10",
        [
            {"tag": "current", "revisionName": "digits-v1", "latestRevision": False, "percent": 90},
            {"tag": "latest", "latestRevision": True, "percent": 0},
            {"tag": "candidate", "revisionName": "digits-v2", "latestRevision": False, "percent": 10},
        ],
    ),
    (
        "kn service update digits --traffic current=50 --traffic candidate=50",
        [
            {"tag": "current", "revisionName": "digits-v1", "latestRevision": False, "percent": 50},
            {"tag": "latest", "latestRevision": True, "percent": 0},
            {"tag": "candidate", "revisionName": "digits-v2", "latestRevision": False, "percent": 50},
        ],
    ),
    (
        "kn service update digits --untag current --untag candidate"
        " --tag digits-v1=previous --tag digits-v2=current --traffic current=100",
        [
            {"tag": "previous", "revisionName": "digits-v1", "latestRevision": False, "percent": 0},
            {"tag": "latest", "latestRevision": True, "percent": 0},
            {"tag": "current", "revisionName": "digits-v2", "latestRevision": False, "percent": 100},
        ],
    ),
    (
        "kn service update digits --traffic previous=100",
        [
            {"tag": "previous", "revisionName": "digits-v1", "latestRevision": False, "percent": 100},
            {"tag": "latest", "latestRevision": True, "percent": 0},
            {"tag": "current", "revisionName": "digits-v2", "latestRevision": False, "percent": 0},
        ],
    ),
]


def test_canary_walkthrough_matches_kn() -> None:
    service = _svc(V1)
    for command, expected in CANARY:
        splits, tags, untags = _kn(command)
        service = apply_traffic(service, splits, tags, untags)
        assert service["spec"]["traffic"] == expected, command


def test_documented_commands_are_in_the_operations_guide() -> None:
    text = OPERATIONS.read_text()
    for command in [c for c, _ in CANARY] + [ROLLBACK_DURING_CANARY]:
        assert command in text, f"docs/operations.md lacks `{command}`"
        assert command.replace("kn service update", "onnxfn traffic") in text


ROLLBACK_DURING_CANARY = "kn service update digits --traffic current=100"


def test_rollback_during_canary() -> None:
    canary = apply_traffic(_svc(CANARY[0][1]), ["current=90", "candidate=10"])
    back = apply_traffic(canary, *_kn(ROLLBACK_DURING_CANARY))
    assert [(t.get("tag"), t["percent"]) for t in back["spec"]["traffic"]] == [
        ("current", 100),
        ("latest", 0),
        ("candidate", 0),
    ]


def test_remainder_goes_to_the_single_unnamed_target() -> None:
    result = apply_traffic(_svc(V1), ["@latest=10"])
    assert result["spec"]["traffic"] == [
        {"tag": "current", "revisionName": "digits-v1", "latestRevision": False, "percent": 90},
        {"tag": "latest", "latestRevision": True, "percent": 10},
    ]
    assert apply_traffic(_svc(V1), ["10"])["spec"]["traffic"] == result["spec"]["traffic"]


def test_untagged_zero_targets_are_dropped_and_new_revisions_appended() -> None:
    start = [{"revisionName": "digits-v1", "latestRevision": False, "percent": 100}]
    result = apply_traffic(_svc(start), ["digits-v2=100"])
    assert result["spec"]["traffic"] == [{"revisionName": "digits-v2", "latestRevision": False, "percent": 100}]


def test_missing_traffic_defaults_to_latest_and_input_is_not_mutated() -> None:
    service = _svc([])
    del service["spec"]["traffic"]
    result = apply_traffic(service, [], ["@latest=live"])
    assert result["spec"]["traffic"] == [{"tag": "live", "latestRevision": True, "percent": 100}]
    assert "traffic" not in service["spec"]


@pytest.mark.parametrize(
    ("splits", "tags", "untags", "message"),
    [
        (["current=90", "latest=20"], [], [], "given traffic percents sum to 110, want <=100"),
        (["current=x"], [], [], "error converting given x to integer"),
        (["current=101"], [], [], "expected 0 <= percent <= 100"),
        (["current=50", "current=50"], [], [], "repetition of revision reference current"),
        (["a=b=c"], [], [], "expecting the value format in value1=value2"),
        ([], ["@latest=a", "@latest=b"], [], "repetition of identifier @latest"),
        ([], ["digits-v2=current"], [], "refusing to overwrite existing tag in service, add flag '--untag current'"),
        ([], ["@latest=newest"], [], "tag 'latest' exists on latest ready revision"),
        ([], [], ["nope", "gone"], "tag(s) nope, gone not present for any revisions of service digits"),
        ([], ["digits-v2=Bad_Tag"], [], "'Bad_Tag' is not a DNS-1035 label"),
    ],
)
def test_errors(splits: list[str], tags: list[str], untags: list[str], message: str) -> None:
    with pytest.raises(TrafficError) as info:
        apply_traffic(_svc(V1), splits, tags, untags)
    assert message in str(info.value)


def test_remainder_errors() -> None:
    three = CANARY[0][1]
    with pytest.raises(TrafficError, match="Only 1 revision should be missing"):
        apply_traffic(_svc(three), ["candidate=10"])
    with pytest.raises(TrafficError, match="cannot determine the missing revision"):
        apply_traffic(_svc(V1, template="digits-v1"), ["@latest=10"])


def test_comma_lists_like_kn_string_slices() -> None:
    assert apply_traffic(_svc(V1), ["current=60,@latest=40"]) == apply_traffic(_svc(V1), ["current=60", "@latest=40"])


def test_command_edits_only_the_traffic_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    render.run(argparse.Namespace(out=tmp_path, image=render.IMAGE, check=False))
    path = tmp_path / "service-digits.yaml"
    before = path.read_text()
    args = argparse.Namespace(
        service="digits", splits=[], traffic=[], tag=["digits-v2=candidate"], untag=[], dir=tmp_path, dry_run=False
    )
    assert traffic.run(args) == 0
    after = path.read_text()
    head = before[: before.index("\n  traffic:")]
    assert after.startswith(head) and "# 2 workers x 16 requests each" in after
    assert yaml.safe_load(after)["spec"]["traffic"] == CANARY[0][1]
    assert traffic.run(argparse.Namespace(**{**vars(args), "tag": [], "splits": ["current=120"]})) == 1
    assert "expected 0 <= percent <= 100" in capsys.readouterr().err
    assert path.read_text() == after
    missing = argparse.Namespace(**{**vars(args), "service": "nothing"})
    assert traffic.run(missing) == 2


def test_cli_accepts_positional_and_kn_spelled_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.cli import main

    render.run(argparse.Namespace(out=tmp_path, image=render.IMAGE, check=False))
    capsys.readouterr()
    argv = ["traffic", "digits", "current=90", "--traffic", "@latest=10", "--dry-run", "--dir", str(tmp_path)]
    assert main(argv) == 0
    gpu, cpu = (doc["spec"]["traffic"] for doc in yaml.safe_load_all(capsys.readouterr().out))
    assert gpu == [
        {"tag": "current", "revisionName": "digits-v1", "latestRevision": False, "percent": 90},
        {"tag": "latest", "latestRevision": True, "percent": 10},
    ]
    assert cpu == [  # the CPU variant (what the embedded platform serves) changes with it
        {"tag": "current", "revisionName": "digits-v1-cpu", "latestRevision": False, "percent": 90},
        {"tag": "latest", "latestRevision": True, "percent": 10},
    ]
