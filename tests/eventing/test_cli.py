"""The eventing commands as a user runs them: publish (JSON lines, with progress) to a topic, read the
topic back with `results`, and `invoke` a running function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT
from shared.eventing.broker_process import KafkaConfig
from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)


def onnxfn(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=PROJECT_ROOT,
        check=False,
    )


def test_publish_a_file_then_read_the_topic_back(kafka: KafkaConfig, ns: str, tmp_path: Path) -> None:
    topic = f"{ns}.cli"
    lines = [
        json.dumps({"type": "dev.onnxfn.digits.request", "id": f"e{i}", "partitionkey": f"k{i % 3}",
                    "data": {"image": [i % 17] * 64}})
        for i in range(150)
    ]  # fmt: skip
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    published = onnxfn("publish", "--topic", topic, "--file", str(events), "--bootstrap-servers",
                       kafka.bootstrap_servers)  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert "published 150, failed 0" in published.stderr  # the progress line's final form
    read = onnxfn("results", topic, "--from-beginning", "--max", "150", "--idle-timeout", "30",
                  "--bootstrap-servers", kafka.bootstrap_servers)  # fmt: skip
    assert read.returncode == 0, read.stderr
    got = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
    assert sorted(e["id"] for e in got) == sorted(f"e{i}" for i in range(150))
    first = next(e for e in got if e["id"] == "e5")
    assert first["type"] == "dev.onnxfn.digits.request" and first["partitionkey"] == "k2"
    assert first["data"] == {"image": [5] * 64}


def test_a_bad_line_is_reported_and_the_good_ones_still_go_out(kafka: KafkaConfig, ns: str, tmp_path: Path) -> None:
    topic = f"{ns}.bad"
    events = tmp_path / "bad.jsonl"
    events.write_text('{"type": "t", "id": "good-1", "data": {}}\n{not json\n{"type": "t", "id": "good-2"}\n')
    result = onnxfn("publish", "--topic", topic, "--file", str(events), "--bootstrap-servers",
                    kafka.bootstrap_servers)  # fmt: skip
    assert result.returncode == 1
    assert "bad.jsonl:2:" in result.stderr and "line skipped" in result.stderr
    assert "published 2, failed 0, 1 bad line(s) skipped" in result.stderr
    read = onnxfn("results", topic, "--from-beginning", "--max", "2", "--idle-timeout", "30",
                  "--bootstrap-servers", kafka.bootstrap_servers)  # fmt: skip
    assert sorted(json.loads(line)["id"] for line in read.stdout.splitlines() if line.strip()) == ["good-1", "good-2"]


def test_invoke_prints_the_reply_event(model_dir: Path) -> None:
    with FunctionProcess("digits", env={"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_WORKERS": "1"}) as server:
        server.wait_ready()
        image = [0, 0, 7, 16, 14, 3, 0, 0, 0, 0, 9, 14, 11, 15, 0, 0, 0, 0, 1, 5, 0, 15, 5, 0, 0, 0, 0, 0, 0, 16,
                 5, 0, 0, 0, 0, 0, 3, 16, 4, 0, 0, 0, 0, 1, 12, 14, 1, 0, 0, 0, 5, 12, 16, 16, 14, 1, 0, 0, 8, 16,
                 14, 10, 13, 3]  # fmt: skip
        result = onnxfn("invoke", server.url + "/", "--type", "dev.onnxfn.digits.request", "--id", "inv-1",
                        "--data", json.dumps({"image": image}))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert '"dev.onnxfn.digits.result"' in result.stdout
        assert '"requestid"' in result.stdout and "inv-1" in result.stdout
        assert '"label": 2' in result.stdout or '"label":2' in result.stdout
