"""`onnxfn traces`: the recent traces a running (or stopped) `onnxfn up` kept, as waterfalls.

Each line is one span, indented under its parent, with its process (`[digits]`, `[onnxfn-plane]`)
and a bar on the trace's time line: where an event spent its time, hop by hop.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared import tracing
from shared.platform.platform import default_state_file, plane_state_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=None, help="the span folder (default: the running up's)")
    parser.add_argument("--state-file", type=Path, default=default_state_file(), help="the up's --state-file")
    parser.add_argument("--last", type=int, default=3, help="how many recent traces to show")
    parser.add_argument("--trace-id", default=None, help="show this trace only (32 hex digits)")
    parser.add_argument("--json", action="store_true", help="print the spans as JSON lines instead")


def trace_dir(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    plane = plane_state_file(args.state_file)
    try:
        found = json.loads(plane.read_text()).get("traces")
    except (OSError, ValueError):
        found = None
    if found:
        return Path(found)
    from shared.eventing.up import trace_dir_of

    return trace_dir_of(args.state_file)


def run(args: argparse.Namespace) -> int:
    directory = trace_dir(args)
    if not directory.is_dir():
        print(f"traces: no spans under {directory} (is `onnxfn up` running, without --no-traces?)", file=sys.stderr)
        return 1
    found = tracing.traces(tracing.read_spans(directory))
    if args.trace_id:
        found = {k: v for k, v in found.items() if k == args.trace_id.lower()}
        if not found:
            print(f"traces: no trace {args.trace_id} under {directory}", file=sys.stderr)
            return 1
    for trace_id, spans in list(found.items())[: args.last]:
        if args.json:
            for span in spans:
                print(json.dumps(span))
            continue
        total_ms = (max(s["end_ns"] for s in spans) - min(s["start_ns"] for s in spans)) / 1e6
        print(f"trace {trace_id}: {len(spans)} spans, {total_ms:.1f} ms")
        print(tracing.waterfall(spans))
        print()
    return 0
