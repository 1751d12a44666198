"""`onnxfn platform`: serve the Knative Services in `knative/` on this machine, at zero when idle.

Prints each Service URL and tag URL (one loopback port each) and the gateway (Host-header routing,
plus `/metrics`, `/status`, `/healthz`); runs until Ctrl-C or SIGTERM. `onnxfn status` reads it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from shared import tracing
from shared.config import PROJECT_ROOT
from shared.platform.platform import Platform, PlatformOptions, default_state_file
from shared.platform.revision import ScalingOptions
from shared.stop_signal import StopSignal


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shorten or bound scaling (shared by `onnxfn platform` and the event plane)."""
    parser.add_argument("--idle-window", type=float, help="seconds idle before scaling to zero (default: Knative's)")
    parser.add_argument("--stable-window", type=float, help="autoscaler stable window in seconds (default: 60)")
    parser.add_argument("--max-processes", type=int, help="processes per revision (default: cores / CPU request)")


def scaling_options(args: argparse.Namespace) -> ScalingOptions:
    return ScalingOptions(
        stable_window_s=args.stable_window, idle_window_s=args.idle_window, max_processes=args.max_processes
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("services", nargs="*", help="Services to serve (default: every Service file)")
    parser.add_argument("--knative", type=Path, default=PROJECT_ROOT / "knative", help="folder of Service files")
    parser.add_argument("--port", type=int, default=8080, help="gateway port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--state-file", type=Path, default=default_state_file(), help="where to say the gateway URL")
    add_scaling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = PlatformOptions(
        knative_dir=args.knative,
        services=tuple(args.services) or None,
        host=args.host,
        gateway_port=args.port,
        scaling=scaling_options(args),
        state_file=args.state_file,
    )
    tracing.configure("onnxfn-platform")
    platform = Platform(options)
    platform.start()
    done = StopSignal().install()
    print(f"gateway {platform.gateway_url} (Host routing; /metrics /status /healthz)", flush=True)
    for service in platform.status()["services"]:
        print(f"{service['name']:<12} {service['url']}", flush=True)
        for target in service["traffic"]:
            if target["tag"]:
                label = f"{target['tag']}-{service['name']}"
                print(f"  {label:<22} {target['url']} -> {target['revision']}", flush=True)
    print(f"process logs in {platform.log_dir}", flush=True)
    done.wait()
    platform.stop()
    return 0
