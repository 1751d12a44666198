"""`onnxfn publish`: CloudEvents to the broker ingress (HTTP) or straight to a Kafka topic.

Events come from flags (one event) or from a JSON-lines file (`--file`, `-` for stdin): one JSON
envelope per line (`type` and `data` at least; `id`, `source` and `specversion` are filled in).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from shared.eventing.cliutil import add_bootstrap, add_event_flags, event_from_dict, event_from_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="broker ingress URL, e.g. http://127.0.0.1:8090/default/default")
    target.add_argument("--topic", help="Kafka topic (Kafka binding, binary mode unless --mode structured)")
    add_bootstrap(parser)
    add_event_flags(parser, type_required=False)
    parser.add_argument("--file", help="JSON-lines file of events ('-' = stdin)")
    parser.add_argument("--mode", choices=("binary", "structured"), default="binary", help="content mode")


def _events(args: argparse.Namespace, progress: _Progress) -> Iterator[Any]:
    """The events to publish. A bad line of a file is reported (file:line: reason) and skipped, so the
    good ones still go out and the exit status says something was wrong."""
    import orjson

    if not args.file:
        if not args.type:
            raise SystemExit("publish: give --type (and --data) or --file")
        yield event_from_flags(args)
        return
    stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    with stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                event = event_from_dict(orjson.loads(line))
            except Exception as exc:
                print(f"\npublish: {args.file}:{number}: {exc} (line skipped)", file=sys.stderr)
                progress.skipped += 1
                continue
            yield event


class _Progress:
    """Counts of what was published, with a progress bar on a terminal (shared.progress)."""

    def __init__(self) -> None:
        import time

        from shared.progress import bar

        self.clock = time.monotonic
        self.start = self.clock()
        self.sent = self.failed = self.skipped = 0
        self.bar = bar("publishing", unit="event")

    def tick(self, ok: bool) -> None:
        self.sent += ok
        self.failed += not ok
        self.bar.update(1)
        if not ok or self.skipped:
            self.bar.set_postfix(failed=self.failed, skipped=self.skipped, refresh=False)

    def done(self) -> None:
        self.bar.close()
        elapsed = self.clock() - self.start
        skipped = f", {self.skipped} bad line(s) skipped" if self.skipped else ""
        print(f"published {self.sent}, failed {self.failed}{skipped} in {elapsed:.2f} s", file=sys.stderr)


def _to_ingress(url: str, events: Iterator[Any], mode: str, progress: _Progress) -> None:
    import http.client
    from urllib.parse import urlsplit

    from shared.events import encode_http

    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80), timeout=30)
    for event in events:
        headers, body = encode_http(mode, [event])
        conn.request("POST", parts.path or "/", body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 202:
            print(f"\n{event.id}: HTTP {response.status} {payload.decode(errors='replace')}", file=sys.stderr)
        progress.tick(response.status == 202)


def _to_topic(servers: str, topic: str, events: Iterator[Any], mode: str, progress: _Progress) -> None:
    from confluent_kafka import Producer

    from shared.eventing.cliutil import kafka_config
    from shared.eventing.kafka_binding import to_record

    producer = Producer(kafka_config(servers).producer(**{"linger.ms": 5}))

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            print(f"\n{topic}: {err.str()}", file=sys.stderr)
        progress.tick(err is None)

    for event in events:
        key, value, headers = to_record(event, mode)
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(30)


def run(args: argparse.Namespace) -> int:
    progress = _Progress()
    try:
        if args.url:
            _to_ingress(args.url, _events(args, progress), args.mode, progress)
        else:
            _to_topic(args.bootstrap_servers, args.topic, _events(args, progress), args.mode, progress)
    except OSError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    progress.done()
    return 0 if progress.failed == 0 and progress.skipped == 0 else 1
