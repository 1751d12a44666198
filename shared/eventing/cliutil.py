"""Small helpers shared by the eventing subcommands (stdlib only at import time)."""

from __future__ import annotations

import argparse
import os
import uuid
from typing import Any

import orjson


def add_bootstrap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""),
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS); ONNXFN_KAFKA_* set client options",
    )


def kafka_config(servers: str) -> Any:
    from shared.eventing.broker_process import KafkaConfig, client_settings

    if not servers:
        raise SystemExit("no Kafka cluster: pass --bootstrap-servers or set KAFKA_BOOTSTRAP_SERVERS")
    return KafkaConfig(servers, client_settings(os.environ))


def connect(servers: str) -> tuple[Any, Any]:
    """(KafkaConfig, embedded broker or None): the cluster named by `servers`, else a new embedded broker."""
    if servers:
        return kafka_config(servers), None
    from shared.eventing.broker_process import EmbeddedBroker

    broker = EmbeddedBroker()
    return broker.start(), broker


def parse_extensions(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--ext {pair!r}: expected NAME=VALUE")
        out[name] = value
    return out


def event_from_dict(envelope: dict[str, Any], default_source: str = "/onnxfn/cli") -> Any:
    """A JSON envelope (missing id, specversion, source filled in) -> Event."""
    from shared.events import SPECVERSION, from_structured_dict

    envelope = dict(envelope)
    envelope.setdefault("specversion", SPECVERSION)
    envelope.setdefault("id", uuid.uuid4().hex)
    envelope.setdefault("source", default_source)
    if "data" in envelope:
        envelope.setdefault("datacontenttype", "application/json")
    return from_structured_dict(envelope)


def event_from_flags(args: argparse.Namespace) -> Any:
    data = orjson.loads(args.data) if args.data is not None else None
    envelope: dict[str, Any] = {"type": args.type, "source": args.source, "data": data}
    if args.id:
        envelope["id"] = args.id
    if args.key:
        envelope["partitionkey"] = args.key
    envelope.update(parse_extensions(args.ext))
    if data is None:
        envelope.pop("data")
    return event_from_dict(envelope)


def add_event_flags(parser: argparse.ArgumentParser, type_required: bool = True) -> None:
    parser.add_argument("--type", required=type_required, help="CloudEvent type")
    parser.add_argument("--source", default="/onnxfn/cli", help="CloudEvent source")
    parser.add_argument("--data", help="JSON data")
    parser.add_argument("--id", help="event id (default: a new UUID)")
    parser.add_argument("--key", help="partitionkey extension (the Kafka record key)")
    parser.add_argument("--ext", action="append", default=[], metavar="NAME=VALUE", help="an extension attribute")
