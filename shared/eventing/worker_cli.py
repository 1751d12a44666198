"""`onnxfn worker NAME` (the command; the loop is `worker.py`).

The Kafka writer is made before the worker's heavy imports (numpy, onnxruntime, pydantic): an
idempotent producer waits about 0.5 s for its producer id before its first acknowledgement, and
made first that wait overlaps the imports and the model load instead of delaying the first results
of a cold start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from shared.eventing.cliutil import add_bootstrap

    parser.add_argument("function", help="the function (Service) whose Trigger this worker serves")
    add_bootstrap(parser)
    parser.add_argument("--eventing", type=Path, default=ROOT / "eventing", help="folder of eventing YAML")
    parser.add_argument("--knative", type=Path, default=ROOT / "knative", help="folder of Knative Services")
    parser.add_argument("--host", default=os.environ.get("ONNXFN_HOST", "0.0.0.0"), help="health/metrics address")
    parser.add_argument(
        "--assign-all",
        action="store_true",
        help="read every partition without joining the group (only as the group's one consumer; `onnxfn up`)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8080")), help="health/metrics port (0: any free one)"
    )


def run(args: argparse.Namespace) -> int:
    from shared.eventing.cliutil import kafka_config
    from shared.service_files import SpecError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One process: no prometheus_client multiprocess mode, whose folder the image names for
    # gunicorn's workers (only `onnxfn serve` makes it). Popped before prometheus_client is imported.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        kafka = kafka_config(args.bootstrap_servers)
        from shared.eventing.sink import KafkaWriter

        writer = KafkaWriter(kafka)
        from shared.eventing import worker

        return worker.main(
            args.function, args.eventing, args.knative, kafka, args.host, args.port, args.assign_all, writer
        )
    except (SpecError, ValueError, OSError) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
