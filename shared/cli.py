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
    "build-models": ("shared.build_models", "build the functions' ONNX models when missing"),
    "bench": ("shared.bench.cli", "benchmark functions against raw onnxruntime and a plain baseline"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxfn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
