"""`onnxfn results TOPIC`: consume a result topic and print its CloudEvents as JSON lines."""

from __future__ import annotations

import argparse
import sys

from shared.eventing.cliutil import add_bootstrap, kafka_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", help="topic to read, e.g. onnxfn.digits.results")
    add_bootstrap(parser)
    parser.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    parser.add_argument("--max", type=int, default=0, help="stop after N events (0: no limit)")
    parser.add_argument("--group", help="consume in this consumer group and commit (default: no group)")
    parser.add_argument("--idle-timeout", type=float, default=0.0, help="stop after S seconds without events")


def run(args: argparse.Namespace) -> int:
    import signal
    import time

    import orjson
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    from shared.errors import FunctionError
    from shared.eventing.kafka_binding import from_record
    from shared.events import to_structured_dict

    kafka = kafka_config(args.bootstrap_servers)
    start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
    reset = "earliest" if args.from_beginning else "latest"
    consumer = Consumer(kafka.consumer(args.group or "onnxfn-results-cli", **{"auto.offset.reset": reset}))
    if args.group:
        consumer.subscribe([args.topic])
    else:
        meta = consumer.list_topics(args.topic, timeout=10).topics.get(args.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            print(f"results: no topic {args.topic!r}", file=sys.stderr)
            return 2
        consumer.assign([TopicPartition(args.topic, p, start) for p in meta.partitions])
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    count, last = 0, time.monotonic()
    try:
        while not stopping and (not args.max or count < args.max):
            if args.idle_timeout and time.monotonic() - last > args.idle_timeout:
                break
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                print(f"results: {error.str()}", file=sys.stderr)
                continue
            last = time.monotonic()
            try:
                line = orjson.dumps(to_structured_dict(from_record(message.headers(), message.value())))
            except FunctionError as exc:
                line = orjson.dumps(
                    {"error": exc.message, "partition": message.partition(), "offset": message.offset()}
                )
            sys.stdout.write(line.decode() + "\n")
            sys.stdout.flush()
            count += 1
            if args.group:
                consumer.commit(message=message, asynchronous=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
