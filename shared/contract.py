"""The function plug-in contract: what `functions/<name>/func.py` provides.

A function folder holds model-specific code only. Its `new()` returns a small handler object:

    config          FunctionConfig: event types, model file and version, batching and serving limits
    setup(dir)      optional: load side files (a tokenizer) from the model directory, once per process
    bind_model(m)   optional: the loaded model's tensor specs (`m.inputs`, `m.outputs`), before warm-up
    preprocess(d)   event data -> model inputs for ONE item (arrays with a leading batch axis of 1);
                    raises InvalidInput listing every problem at once
    postprocess(o, d)  model outputs for ONE item (batch axis removed) and the request data -> result
                    data, or a Result when the function picks its result type per event
    example()       request data used for warm-up and benchmarks
    samples(n)      optional: up to n (request data, extension attributes) pairs for `onnxfn up`'s
                    sample stream and the event benchmarks; default: the example, n times

Everything else (ONNX run, batching, wire formats, errors, health, metrics) lives in `shared/`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Batching:
    """Dynamic batching limits of one function (per process)."""

    max_batch_size: int = 32
    queue_capacity: int = 512


@dataclass(frozen=True)
class Scaling:
    """What one instance holds and how Knative should scale it (rendered into knative/)."""

    min_scale: int = 0
    max_scale: int = 4
    initial_scale: int = 1
    retention_period: str = "60s"
    gpu: bool = False
    cpu: str = "2"
    memory: str = "1Gi"
    timeout_seconds: int = 120
    # Memory of the GPU variant's pod: each worker process maps the CUDA/cuDNN libraries (~1 GiB).
    gpu_memory: str = "4Gi"


@dataclass(frozen=True)
class FunctionConfig:
    """Static description of a function, declared by the function itself."""

    name: str
    accepts: tuple[str, ...]
    result_types: tuple[str, ...]
    model_file: str | None = None
    model_version: str = "1"
    # Every servable model version -> its file (relative to the model directory); a revision picks one
    # with ONNXFN_MODEL_VERSION. Default: just `{model_version: model_file}`.
    model_versions: Mapping[str, str] = field(default_factory=dict, hash=False)
    batching: Batching = field(default_factory=Batching)
    scaling: Scaling = field(default_factory=Scaling)
    # Asyncio worker processes. On 2 cores two measured best for compute-bound models (1.3-1.4x
    # one worker on the CNN: one process's event loop and inference thread share one GIL) and
    # for batched CloudEvents (2x on digits); one was ~1.1-1.3x two on single HTTP-bound events.
    workers: int = 2
    # Requests one worker holds at once: its share of the pod's containerConcurrency.
    concurrency: int = 16
    # Where the session lives (see Settings.engine): "auto", "per-worker" or "shared".
    engine: str = "auto"

    @property
    def result_type(self) -> str:
        """The default result type (the first declared)."""
        return self.result_types[0]

    def model_file_for(self, version: str | None = None) -> str | None:
        """The model file of `version` (default: `model_version`); ValueError for an unknown version."""
        version = version or self.model_version
        if self.model_file is None:
            return None
        if version not in self.model_versions:
            known = ", ".join(sorted(self.model_versions))
            raise ValueError(f"{self.name}: no model version {version!r} (known: {known})")
        return self.model_versions[version]

    def __post_init__(self) -> None:
        if self.model_file is not None:
            versions = {self.model_version: self.model_file, **self.model_versions}
            if versions[self.model_version] != self.model_file:
                raise ValueError(f"{self.name}: model_versions[{self.model_version!r}] differs from model_file")
            object.__setattr__(self, "model_versions", versions)
        overlap = set(self.accepts) & set(self.result_types)
        if overlap:
            raise ValueError(f"{self.name}: result type(s) {sorted(overlap)} equal a request type (loop)")


@dataclass(frozen=True)
class Result:
    """Result data with an explicit result type (one of `FunctionConfig.result_types`)."""

    data: Any
    type: str | None = None


@runtime_checkable
class Handler(Protocol):
    """What `functions/<name>.new()` returns."""

    config: FunctionConfig

    def preprocess(self, data: Any) -> Feeds: ...

    def postprocess(self, outputs: Mapping[str, np.ndarray], data: Any) -> Any: ...

    def example(self) -> Any: ...


def load_handler(name: str) -> Handler:
    """Import `functions.<name>` (or a dotted module path such as `mypkg.myfunc`) and call its `new()`."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"invalid function name {name!r}")
    module_name = name if "." in name else f"functions.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ValueError(f"unknown function {name!r} (no module {module_name})") from None
    handler: Handler = module.new()
    return handler


def function_names() -> list[str]:
    """Every function folder that has a `new()`."""
    root = Path(__file__).resolve().parent.parent / "functions"
    return sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists() and not p.name.startswith("_"))


def setup_handler(handler: Handler, model_dir: Path) -> None:
    """Call the handler's optional `setup(model_dir)`."""
    setup = getattr(handler, "setup", None)
    if setup is not None:
        setup(model_dir)


def bind_model(handler: Handler, model: Any) -> None:
    """Call the handler's optional `bind_model(model)` with the loaded model (or the engine's specs)."""
    bind = getattr(handler, "bind_model", None)
    if bind is not None:
        bind(model)


def samples(handler: Handler, count: int) -> list[tuple[Any, dict[str, str]]]:
    """The handler's optional `samples(count)`: (request data, extension attributes) pairs; else its
    `example()` `count` times."""
    own = getattr(handler, "samples", None)
    if own is not None:
        return [(data, dict(attributes)) for data, attributes in own(count)][:count]
    return [(handler.example(), {}) for _ in range(count)]
