"""Fixtures: one embedded Tansu broker per session (or KAFKA_BOOTSTRAP_SERVERS), a plane factory."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from shared.eventing import broker_process, spec
from shared.eventing.broker_process import KafkaConfig
from shared.eventing.plane import EventPlane


def _docker_engine_answers() -> bool:
    """True when a Docker engine answers here (then the suite also runs against a Kafka container)."""
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


# The embedded Tansu broker always (or the cluster in KAFKA_BOOTSTRAP_SERVERS); a real Apache Kafka in a
# container as well wherever a Docker engine answers (never on the project's own machines).
BROKERS = ["embedded", *(["container"] if _docker_engine_answers() else [])]


@pytest.fixture(scope="session", params=BROKERS)
def kafka(request: pytest.FixtureRequest) -> Iterator[KafkaConfig]:
    if request.param == "container":
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield KafkaConfig(container.get_bootstrap_server())
        return
    existing = broker_process.from_env()
    if existing is not None:
        yield existing
        return
    broker = broker_process.EmbeddedBroker()
    try:
        started = broker.start()
        # Tansu answers a new group's JoinGroup after about half the session timeout (3 s at the
        # plane's 6 s): a shorter one here makes each plane the tests start join in ~1 s.
        yield replace(started, client={"session.timeout.ms": "2000", "heartbeat.interval.ms": "500"})
    finally:
        broker.stop()


@pytest.fixture
def ns() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def plane(kafka: KafkaConfig, tmp_path: Path) -> Iterator[Callable[[str], EventPlane]]:
    """`plane(yaml_text)` loads the YAML (no Services) and starts an event plane on the broker."""
    started: list[EventPlane] = []

    def make(text: str) -> EventPlane:
        directory = tmp_path / f"eventing-{len(started)}"
        directory.mkdir()
        (directory / "eventing.yaml").write_text(text)
        loaded = spec.load(directory, services=())
        event_plane = EventPlane(loaded, kafka, {})
        event_plane.start()
        started.append(event_plane)
        return event_plane

    yield make
    for event_plane in started:
        event_plane.stop()
