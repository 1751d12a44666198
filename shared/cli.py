"""The `onnxfn` command: one subcommand per module, imported only when used.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("shared.serve", "run one function under gunicorn on $PORT (the container's command)"),
    "new": (
        "shared.scaffold",
        "a new function from an ONNX file: handler, test, Trigger, Services (make run serves it)",
    ),
    "build-models": ("shared.build_models", "build the functions' ONNX models when missing"),
    "bench": ("shared.bench.cli", "benchmark: --peers vs naive Flask, KServe, MLServer; else digits, embed vs raw ORT"),
    "render": ("shared.render", "render knative/ Services from the functions' configs (--check: verify)"),
    "traffic": ("shared.traffic", "edit a committed Service's traffic like `kn service update`"),
    "up": ("shared.eventing.up", "broker, event plane and functions from eventing/ with a sample stream (make run)"),
    "worker": (
        "shared.eventing.worker_cli",
        "a function's Trigger as a Kafka consume-infer-produce loop (no HTTP hop)",
    ),
    "publish": ("shared.eventing.publish", "publish CloudEvents to the broker ingress or a Kafka topic"),
    "results": ("shared.eventing.results", "print the CloudEvents on a result topic as JSON lines"),
    "invoke": ("shared.eventing.invoke", "send one CloudEvent to a function over HTTP and print the reply"),
    "plot": ("shared.bench.plots", "PNGs of benchmark reports (peers, functions' cold starts, soak), next to the JSON"),
    "bench-events": ("shared.eventing.bench", "event-path benchmark: raw broker, then digits end to end"),
    "platform": ("shared.platform.cli", "serve knative/ Services on this machine: activator, scale to zero, traffic"),
    "traces": ("shared.traces_cli", "the recent traces `onnxfn up` kept, as waterfalls (one event across every hop)"),
    "status": ("shared.platform.status", "services, revisions, traffic, processes and cold starts of the platform"),
    "platform-bench": ("shared.platform.bench", "platform benchmark: cold starts, warm overhead, burst, INT8 vs FP32"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (fast start)."""
    parser = argparse.ArgumentParser(prog="onnxfn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if only in (None, name):
            module = importlib.import_module(module_name)
            command.description = module.__doc__
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
