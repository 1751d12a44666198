"""`onnxfn new NAME --model FILE.onnx` in a copy of this repository, then `onnxfn up` there: the new
function serves end to end (ingress -> Trigger -> function -> its result topic), its generated test
passes and its files pass the project's linters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared.config import PROJECT_ROOT

pytestmark = pytest.mark.timeout(240)
MODELS = PROJECT_ROOT / "models"


def _onnxfn(root: Path, *argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *argv], cwd=root, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    """This repository's files (tracked and untracked, not ignored) in a new folder, with the
    built models linked in: what a user's clone looks like after `make models`."""
    root = tmp_path / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name.decode()
        if source.is_file():
            (root / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name.decode())
    (root / "models").mkdir()
    for built in MODELS.iterdir():
        if built.is_dir():
            (root / "models" / built.name).symlink_to(built)
    yield root


def test_new_refuses_a_bad_name_a_taken_one_and_a_file_that_is_no_model(checkout: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    model = MODELS / "digits" / "1" / "model.onnx"
    assert "is not a function name" in _onnxfn(checkout, "new", "My-Model", "--model", str(model)).stderr
    taken = _onnxfn(checkout, "new", "digits", "--model", str(model))
    assert taken.returncode == 2 and "already exist" in taken.stderr
    broken = _onnxfn(checkout, "new", "bogus", "--model", str(bogus))
    assert broken.returncode == 2 and "is not an ONNX model" in broken.stderr
    assert not (checkout / "functions" / "bogus").exists()


def test_new_then_up_serves_the_new_function_end_to_end(checkout: Path, tmp_path: Path) -> None:
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    from functions.digits.build import held_out_split

    mine = tmp_path / "classifier.onnx"
    shutil.copyfile(MODELS / "digits" / "1" / "model.onnx", mine)  # "your own model"
    made = _onnxfn(checkout, "new", "mine", "--model", str(mine))
    assert made.returncode == 0, made.stderr
    func = (checkout / "functions" / "mine" / "func.py").read_text()
    assert "input  image: float32 [N, 1, 8, 8]" in func and "output probabilities: float32 [N, 10]" in func
    generated = ["functions/mine", "tests/functions/test_mine.py"]
    for lint in (["check"], ["format", "--check"]):
        done = subprocess.run([sys.executable, "-m", "ruff", *lint, *generated], cwd=checkout, capture_output=True)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/functions/test_mine.py"],
        cwd=checkout, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout
    assert (checkout / "knative" / "service-mine.yaml").is_file()
    assert _onnxfn(checkout, "render", "--check").returncode == 0  # the Services are the rendered ones
    built = _onnxfn(checkout, "build-models", timeout_s=120)
    assert built.returncode == 0 and "building mine model" in built.stdout, built.stdout + built.stderr

    argv = ["up", "--samples", "0", "--ingress-port", "0", "--state-file", str(tmp_path / "platform.json")]
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *argv], cwd=checkout, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    sys.path.insert(0, str(PROJECT_ROOT / "tests" / "eventing"))
    from test_up import Output, stop_up

    out = Output(process)
    try:
        url = out.wait_for(r"^broker ingress:\s+(\S+)", 60).group(1)
        out.wait_for(r"^READY$", 60)
        images, labels = held_out_split()
        event_id = uuid.uuid4().hex
        headers = {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/tests",
                   "ce-type": "dev.onnxfn.mine.request", "content-type": "application/json"}  # fmt: skip
        row = images[0].tolist()  # [1, 8, 8]
        assert requests.post(url, data=json.dumps({"instances": [row]}), headers=headers, timeout=10).status_code == 202
        line = out.wait_for(r"^\s+onnxfn\.mine\.results\s+dev\.onnxfn\.mine\.result\s", 60)
        assert line is not None
        servers = out.wait_for(r"^Kafka bootstrap servers: (\S+)", 1).group(1)
        result = _read_result(servers, "onnxfn.mine.results", event_id)
        probabilities = result["predictions"][0]
        assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-4
        assert max(range(10), key=probabilities.__getitem__) == int(labels[0])
    finally:
        assert stop_up(process) == 0


def _read_result(servers: str, topic: str, request_id: str) -> dict[str, object]:
    """The data of the result event answering `request_id` on `topic`."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from shared.eventing.broker_process import KafkaConfig
    from shared.eventing.kafka_binding import from_record

    consumer = Consumer(KafkaConfig(servers).consumer("test-scaffold-" + uuid.uuid4().hex[:6]))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        for _ in range(100):
            for message in consumer.consume(100, 0.2):
                if message.error() is None:
                    event = from_record(message.headers(), message.value())
                    if event.attributes.get("requestid") == request_id:
                        data = event.data
                        assert isinstance(data, dict)
                        return data
    finally:
        consumer.close()
    raise AssertionError(f"no result for {request_id} on {topic}")
