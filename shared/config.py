"""Settings: read once from a mapping (the environment) into a typed, frozen object.

Every variable has the prefix `ONNXFN_`, except the ones the Knative runtime contract defines
(`PORT`, `K_SERVICE`, `K_REVISION`, `K_CONFIGURATION`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ONNXFN_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} is below the minimum {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise SettingsError(f"{name}={value} is negative")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (true/false)")


PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
# Where the onnxruntime session lives: one per HTTP worker, or one engine process per device
# shared by every worker; auto: the function's choice, else shared on a GPU, per-worker on CPU.
ENGINE_CHOICES = ("auto", "per-worker", "shared")


@dataclass(frozen=True)
class Settings:
    """Process-wide settings of one function server.

    Optional fields left as None fall back to the function's own config (`FunctionConfig`).
    """

    function: str
    port: int = 8080
    host: str = "0.0.0.0"
    model_dir: Path = PROJECT_ROOT / "models"
    cache_dir: Path = Path("/tmp/onnxfn-cache")
    providers: str = "auto"
    engine: str = "auto"
    engine_socket: Path | None = None
    workers: int | None = None
    intra_op_threads: int | None = None
    inference_threads: int | None = None
    intra_op_spinning: bool | None = None
    max_batch_size: int | None = None
    queue_capacity: int | None = None
    max_body_bytes: int = 1 << 20
    graceful_timeout_s: int = 20
    ready_wait_s: float = 10.0
    state_dir: Path | None = None
    log_level: str = "info"
    model_version: str = ""
    k_service: str = ""
    k_revision: str = ""
    k_configuration: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, function: str | None = None) -> Settings:
        """Build settings from `env` (default: `os.environ`). `function` overrides ONNXFN_FUNCTION."""
        env = os.environ if env is None else env
        name = function or env.get(PREFIX + "FUNCTION", "")
        if not name:
            raise SettingsError("no function named: pass one or set ONNXFN_FUNCTION")
        providers = env.get(PREFIX + "PROVIDERS", "auto").lower()
        if providers not in PROVIDER_CHOICES:
            raise SettingsError(f"ONNXFN_PROVIDERS={providers!r}: choose one of {', '.join(PROVIDER_CHOICES)}")
        engine = env.get(PREFIX + "ENGINE", "auto").lower()
        if engine not in ENGINE_CHOICES:
            raise SettingsError(f"ONNXFN_ENGINE={engine!r}: choose one of {', '.join(ENGINE_CHOICES)}")
        socket = env.get(PREFIX + "ENGINE_SOCKET")
        model_dir = env.get(PREFIX + "MODEL_DIR")
        cache_dir = env.get(PREFIX + "CACHE_DIR")
        return cls(
            function=name,
            port=_int(env, "PORT", 8080, 1) or 8080,
            host=env.get(PREFIX + "HOST", "0.0.0.0"),
            model_dir=Path(model_dir) if model_dir else PROJECT_ROOT / "models",
            cache_dir=Path(cache_dir) if cache_dir else Path("/tmp/onnxfn-cache"),
            providers=providers,
            engine=engine,
            engine_socket=Path(socket) if socket else None,
            workers=_int(env, PREFIX + "WORKERS", None, 1),
            intra_op_threads=_int(env, PREFIX + "INTRA_OP_THREADS", None, 1),
            inference_threads=_int(env, PREFIX + "INFERENCE_THREADS", None, 1),
            intra_op_spinning=_bool(env, PREFIX + "INTRA_OP_SPINNING"),
            max_batch_size=_int(env, PREFIX + "MAX_BATCH_SIZE", None, 1),
            queue_capacity=_int(env, PREFIX + "QUEUE_CAPACITY", None, 1),
            max_body_bytes=_int(env, PREFIX + "MAX_BODY_BYTES", 1 << 20, 1) or 1 << 20,
            graceful_timeout_s=_int(env, PREFIX + "GRACEFUL_TIMEOUT", 20, 0) or 0,
            ready_wait_s=_float(env, PREFIX + "READY_WAIT", 10.0) or 0.0,
            state_dir=Path(env[PREFIX + "STATE_DIR"]) if env.get(PREFIX + "STATE_DIR") else None,
            log_level=env.get(PREFIX + "LOG_LEVEL", "info").lower(),
            model_version=env.get(PREFIX + "MODEL_VERSION", ""),
            k_service=env.get("K_SERVICE", ""),
            k_revision=env.get("K_REVISION", ""),
            k_configuration=env.get("K_CONFIGURATION", ""),
        )


def available_cores() -> int:
    """CPU cores this process may use: affinity, capped by a cgroup v2 quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
