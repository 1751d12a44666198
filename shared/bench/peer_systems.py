"""The systems `onnxfn bench --peers` compares, each started the way its users start it.

- onnxfn: `onnxfn serve --model FILE` (the generic function; `onnxfn serve digits` for digits),
  the runtime's default layout, binary-mode CloudEvents at `POST /`;
- naive: Flask + gunicorn, 2 sync workers, `POST /predict` (shared/bench/peers/naive_app.py);
- kserve: KServe 0.21 ModelServer, 2 workers, v1 `:predict` (peers/kserve_app.py);
- mlserver: MLServer 1.7 with adaptive batching, V2 infer (peers/mlserver_runtime.py).
Each peer runs from its own venv under `.bench/venvs/`, made on first use with pinned versions
and the same onnxruntime as onnxfn's. Request bodies carry the same row in each system's form.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT
from shared.process import free_port

PEERS_DIR = Path(__file__).resolve().parent / "peers"
VENVS = PROJECT_ROOT / ".bench" / "venvs"
SYSTEMS = ("onnxfn", "naive", "kserve", "mlserver")


def _ours(package: str) -> str:
    from importlib.metadata import version

    return f"{package}=={version(package)}"


def requirements(peer: str) -> list[str]:
    """What each peer's venv holds (onnxruntime always the same build as ours)."""
    common = [_ours("onnxruntime"), _ours("numpy")]
    return {
        "naive": [_ours("flask"), _ours("gunicorn"), *common],
        "kserve": ["kserve==0.21.0", *common],
        # MLServer 1.7.1 calls asyncio.get_event_loop() outside a loop, which uvloop >= 0.22 refuses.
        "mlserver": ["mlserver==1.7.1", "uvloop==0.21.0", *common],
    }[peer]


def ensure_venv(peer: str, say: Any = print) -> Path:
    """The peer's venv (made, or remade when its requirements changed); returns its bin folder."""
    venv = VENVS / peer
    wanted = "\n".join(requirements(peer))
    stamp = venv / ".requirements"
    if stamp.is_file() and stamp.read_text() == wanted:
        return venv / "bin"
    say(f"making the {peer} venv in {venv} ({', '.join(requirements(peer))}) ...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *requirements(peer)], check=True
    )
    stamp.write_text(wanted)
    return venv / "bin"


@dataclass
class Target:
    """A model as the systems see it: its file, one request row and the onnxfn function to serve it."""

    name: str
    path: Path
    row: Any
    function: str | None = None  # a repo function (its own validation) instead of the generic one
    function_data: Any = None  # that function's event data for the same row


@dataclass
class Launch:
    """How to start one system for one model, and what one request to it looks like."""

    system: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    path: str
    headers: dict[str, str]
    body: bytes
    cwd: Path = PROJECT_ROOT
    workdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _shape(row: Any) -> list[int]:
    shape = []
    while isinstance(row, list):
        shape.append(len(row))
        row = row[0] if row else None
    return shape


def _flat(row: Any) -> list[float]:
    if isinstance(row, list):
        return [v for item in row for v in _flat(item)]
    return [row]


def launch(system: str, target: Target, say: Any = print) -> Launch:
    """How to start `system` for `target`. `onnxfn/workers=1/engine=shared` is onnxfn with
    ONNXFN_WORKERS=1 and ONNXFN_ENGINE=shared (a layout to compare)."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "BENCH_MODEL": str(target.path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    instances = json.dumps({"instances": [target.row]}).encode()
    system, *overrides = system.split("/")
    for override in overrides:
        key, _, value = override.partition("=")
        env[f"ONNXFN_{key.upper().replace('-', '_')}"] = value
    if system == "onnxfn":
        argv = [sys.executable, "-m", "shared.cli", "serve"]
        if target.function:
            argv.append(target.function)
            data, accepts = target.function_data, f"dev.onnxfn.{target.function}.request"
            body = json.dumps(data).encode()
        else:
            argv += ["--model", str(target.path), "--name", target.name]
            accepts, body = f"dev.onnxfn.{target.name}.request", instances
        headers = {
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-id": "bench-1",
            "ce-source": "/bench",
            "ce-type": accepts,
        }
        env["ONNXFN_HOST"] = "127.0.0.1"
        return Launch(system, argv, env, port, "/health/readiness", "/", headers, body)
    bin_dir = ensure_venv(system, say)
    json_headers = {"Content-Type": "application/json"}
    if system == "naive":
        argv = [str(bin_dir / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(PEERS_DIR)]
        return Launch(system, [*argv, "naive_app:app"], env, port, "/ready", "/predict", json_headers, instances)
    if system == "kserve":
        env["GRPC_PORT"] = str(free_port())
        argv = [str(bin_dir / "python"), str(PEERS_DIR / "kserve_app.py")]
        return Launch(system, argv, env, port, "/v1/models/model", "/v1/models/model:predict", json_headers, instances)
    if system == "mlserver":
        workdir = tempfile.TemporaryDirectory(prefix="onnxfn-bench-mlserver-")
        folder = Path(workdir.name)
        settings = {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1"}
        model = {
            "name": "model",
            "implementation": "mlserver_runtime.OnnxRuntime",
            "parameters": {"uri": str(target.path)},
            "max_batch_size": 32,
            "max_batch_time": 0.001,
        }
        (folder / "settings.json").write_text(json.dumps(settings))
        (folder / "model-settings.json").write_text(json.dumps(model))
        env["PYTHONPATH"] = str(PEERS_DIR)
        tensor = {"name": "x", "shape": [1, *_shape(target.row)], "datatype": "FP32", "data": _flat(target.row)}
        body = json.dumps({"inputs": [tensor]}).encode()
        argv = [str(bin_dir / "mlserver"), "start", str(folder)]
        return Launch(
            system,
            argv,
            env,
            port,
            "/v2/models/model/ready",
            "/v2/models/model/infer",
            json_headers,
            body,
            folder,
            workdir,
        )
    raise ValueError(f"unknown system {system!r} (choose from {', '.join(SYSTEMS)})")
