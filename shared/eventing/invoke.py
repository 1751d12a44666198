"""`onnxfn invoke URL`: send one CloudEvent to a function over HTTP and print the reply."""

from __future__ import annotations

import argparse
import sys

from shared.eventing.cliutil import add_event_flags, event_from_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="function URL, e.g. http://127.0.0.1:8080/")
    add_event_flags(parser)
    parser.add_argument("--mode", choices=("binary", "structured"), default="binary", help="HTTP content mode")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")


def run(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    import orjson

    from shared.errors import FunctionError
    from shared.events import decode_http, encode_http, to_structured_dict

    event = event_from_flags(args)
    headers, body = encode_http(args.mode, [event])
    request = urllib.request.Request(args.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            status, reply_headers, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, reply_headers, payload = exc.code, dict(exc.headers), exc.read()
    except OSError as exc:
        print(f"invoke: {args.url}: {exc}", file=sys.stderr)
        return 2
    print(f"HTTP {status}", file=sys.stderr)
    if 200 <= status < 300 and payload:
        try:
            _, events = decode_http({k.lower(): v for k, v in reply_headers.items()}, payload)
        except FunctionError as exc:
            print(f"reply is not a CloudEvent: {exc.message}", file=sys.stderr)
            sys.stdout.write(payload.decode(errors="replace") + "\n")
            return 1
        for reply in events:
            sys.stdout.write(orjson.dumps(to_structured_dict(reply)).decode() + "\n")
        return 0
    if payload:
        sys.stdout.write(payload.decode(errors="replace") + "\n")
    return 0 if 200 <= status < 300 else 1
