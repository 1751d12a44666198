"""OnnxModel: one onnxruntime session, built deliberately, with input metadata and a typed run.

Knows nothing of HTTP or events. onnxruntime is imported on first use, never at module import
(the gunicorn master imports this module and must not hold onnxruntime's threads across a fork). Session options:
- graph optimisation ORT_ENABLE_ALL, the optimised graph cached on disk (keyed by model bytes,
  onnxruntime version and providers) so a cold start loads it with optimisation off;
- intra-op threads sized to cores / workers, one inter-op thread, spinning off when several
  worker processes share the cores;
- CUDA (and TensorRT where its libraries load) only when a GPU is visible; IOBinding on CUDA.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

# onnxruntime's telemetry off before it first starts (the Python call below comes too late for
# its start-up): nothing sent, and no device-ID file to persist, which on a read-only root or an
# unwritable HOME logs "Failed to persist telemetry device ID" at every start.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# ONNX tensor type -> numpy dtype.
ONNX_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape (None for a dynamic axis) of a model input or output."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    onnx_type: str

    @property
    def batched(self) -> bool:
        return bool(self.shape) and self.shape[0] is None


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is visible to this process (device node or driver entry)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return Path("/dev/nvidia0").exists() or (gpus.is_dir() and any(gpus.iterdir()))


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the NVIDIA pip wheels when they are installed (onnxruntime-gpu >= 1.21)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # libraries may come from the system instead
            log.info("onnxruntime.preload_dlls() did not load CUDA libraries: %s", exc)


class GpuUnavailable(RuntimeError):
    """A GPU was asked for (ONNXFN_PROVIDERS=cuda or tensorrt) and onnxruntime cannot use one: the
    function stays not ready with this reason rather than serve GPU traffic at CPU speed."""


FALLBACK_HINT = "set ONNXFN_PROVIDERS=auto to run on the CPU instead"


def usable_providers() -> list[str]:
    """onnxruntime's available providers, TensorRT only when its library (libnvinfer) is present."""
    import onnxruntime as ort

    tensorrt = ctypes.util.find_library("nvinfer") is not None
    return [p for p in ort.get_available_providers() if p != "TensorrtExecutionProvider" or tensorrt]


def choose_providers(requested: str) -> list[str]:
    """Execution providers for `requested` in auto|cpu|cuda|tensorrt; CPU always last. Raises
    GpuUnavailable when cuda or tensorrt is asked for and cannot be had."""
    available = set(usable_providers())
    if requested in ("cuda", "tensorrt"):
        missing = _gpu_missing(requested, available)
        if missing:
            raise GpuUnavailable(f"ONNXFN_PROVIDERS={requested}: {missing}; {FALLBACK_HINT}")
    providers: list[str] = []
    want_gpu = requested in ("cuda", "tensorrt") or (requested == "auto" and gpu_visible())
    if want_gpu and "CUDAExecutionProvider" in available:
        _preload_cuda_libraries()
        if "TensorrtExecutionProvider" in available and requested in ("tensorrt", "auto"):
            providers.append("TensorrtExecutionProvider")
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


def _gpu_missing(requested: str, available: set[str]) -> str:
    """Why `requested` cannot run here ("" when it can, as far as can be told before a session)."""
    if "CUDAExecutionProvider" not in available:
        return f"this onnxruntime has no CUDA provider (it has {', '.join(sorted(available))}; install onnxruntime-gpu)"
    if not gpu_visible():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        return f"no NVIDIA GPU is visible to this process (no /dev/nvidia0{shown})"
    if requested == "tensorrt" and "TensorrtExecutionProvider" not in available:
        return "TensorRT's library libnvinfer is not installed"
    return ""


def tensor_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(arg.name, ONNX_DTYPES.get(arg.type, np.dtype(np.float32)), shape, arg.type)


def _cache_path(model_path: Path, cache_dir: Path, providers: list[str]) -> Path:
    import onnxruntime as ort

    digest = hashlib.sha256()
    digest.update(model_path.read_bytes())
    digest.update(ort.__version__.encode())
    digest.update(",".join(providers).encode())
    return cache_dir / f"{model_path.stem}-{digest.hexdigest()[:16]}.optimized.onnx"


def _writable_dir(path: Path) -> bool:
    """Create `path` if needed; True when this process can write there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


class OnnxModel:
    """An onnxruntime session plus its input/output specs."""

    def __init__(
        self,
        model_path: Path,
        *,
        providers: str = "auto",
        intra_op_threads: int = 1,
        spinning: bool = False,
        cache_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        if not model_path.is_file():
            raise FileNotFoundError(f"model file {model_path} not found (run `onnxfn build-models`)")
        self.path = model_path
        ort.disable_telemetry_events()  # no device-ID file to persist (read-only root), nothing sent
        self.providers = choose_providers(providers)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        load_path = model_path
        self.cache_hit = False
        if cache_dir is not None and not _writable_dir(cache_dir):
            log.warning("model cache %s cannot be written; loading without the cache", cache_dir)
            cache_dir = None
        if cache_dir is not None:
            cached = _cache_path(model_path, cache_dir, self.providers)
            if cached.is_file():
                load_path, self.cache_hit = cached, True
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                # Written by onnxruntime at session creation; renamed into place so readers never see half.
                self._pending_cache: tuple[Path, Path] | None = (
                    cached.with_suffix(f".{os.getpid()}.tmp"),
                    cached,
                )
                options.optimized_model_filepath = str(self._pending_cache[0])
        else:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        pending = getattr(self, "_pending_cache", None)
        try:
            self.session = ort.InferenceSession(str(load_path), sess_options=options, providers=self.providers)
        except Exception as exc:
            if pending is None:
                raise
            # Writing the optimised copy failed (a full or read-only cache folder): serve without it.
            log.warning("cannot write the optimised model to %s (%s); loading without the cache", cache_dir, exc)
            pending[0].unlink(missing_ok=True)
            options.optimized_model_filepath = ""
            pending = None
            self.session = ort.InferenceSession(str(load_path), sess_options=options, providers=self.providers)
        if pending is not None and pending[0].is_file():
            os.replace(pending[0], pending[1])
        self.providers = self.session.get_providers()
        if providers in ("cuda", "tensorrt") and "CUDAExecutionProvider" not in self.providers:
            raise GpuUnavailable(
                f"ONNXFN_PROVIDERS={providers}: onnxruntime could not start its CUDA provider and fell back to "
                f"{', '.join(self.providers)} (its log above says why, e.g. libcuda.so.1 missing); {FALLBACK_HINT}"
            )
        self.inputs = [tensor_spec(a) for a in self.session.get_inputs()]
        self.outputs = [tensor_spec(a) for a in self.session.get_outputs()]
        self.output_names = [o.name for o in self.outputs]
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""
        if self.on_gpu:
            return self._run_bound(feeds)
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, values, strict=True))

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> list[str]:
        """Every mismatch between one item's feeds and the model's inputs (names, dtypes, ranks, dims)."""
        return check_feeds(self.inputs, feeds)


class ModelInfo(Protocol):
    """What the pipeline knows of a model, whether in this process or in the engine process."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]
    on_gpu: bool

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> list[str]: ...


def check_feeds(inputs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> list[str]:
    """Every mismatch between one item's feeds and a model's inputs (names, dtypes, ranks, dims)."""
    problems: list[str] = []
    expected = {spec.name: spec for spec in inputs}
    missing = expected.keys() - feeds.keys()
    extra = feeds.keys() - expected.keys()
    problems += [f"missing model input '{name}'" for name in sorted(missing)]
    problems += [f"unknown model input '{name}'" for name in sorted(extra)]
    for name, array in feeds.items():
        spec = expected.get(name)
        if spec is None:
            continue
        if array.dtype != spec.dtype:
            problems.append(f"input '{name}': dtype {array.dtype}, model wants {spec.dtype}")
        if array.ndim != len(spec.shape):
            problems.append(f"input '{name}': rank {array.ndim}, model wants {len(spec.shape)}")
            continue
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if want is not None and got != want:
                problems.append(f"input '{name}': axis {axis} is {got}, model wants {want}")
    return problems
