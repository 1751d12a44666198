"""Build the functions' ONNX models when missing.

A built model is a cache: `models/<model_file>` plus `metadata.json` beside it. Present models are
kept unless `--force`. Each function with a model has `functions/<name>/build.py` defining
`build(model_dir: Path) -> dict` (the metadata it also writes). Heavy libraries (torch,
scikit-learn) are imported by those builds only.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.config import PREFIX, PROJECT_ROOT
from shared.contract import function_names, load_handler

METADATA_FILE = "metadata.json"


def write_metadata(model_path: Path, started: float, metadata: dict[str, Any]) -> dict[str, Any]:
    """Add what every build records (size, build time, versions) and write `metadata.json` beside the model."""
    import json
    import platform

    import torch

    metadata = {
        **metadata,
        "model_bytes": model_path.stat().st_size,
        "build_seconds": round(time.perf_counter() - started, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    (model_path.parent / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def model_file(name: str) -> str | None:
    """The model path of function `name`, relative to the model directory (None: no model)."""
    return load_handler(name).config.model_file


def model_functions() -> list[str]:
    """Every function that serves a model."""
    return [name for name in function_names() if model_file(name) is not None]


def is_built(model_dir: Path, name: str) -> bool:
    """Whether every model version of function `name` and its metadata are present under `model_dir`."""
    paths = [model_dir / relative for relative in load_handler(name).config.model_versions.values()]
    return all(path.is_file() and (path.parent / METADATA_FILE).is_file() for path in paths)


@contextmanager
def _lock(model_dir: Path, name: str) -> Iterator[None]:
    """An exclusive lock on the model directory itself, so concurrent callers build a model once
    and no lock file is left behind (in an image: no root-owned leftovers)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(model_dir, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


def _summary(metadata: dict[str, Any]) -> str:
    metrics = metadata.get("metrics", {})
    return "".join(f", {key.replace('_', ' ')} {value:.4f}" for key, value in metrics.items())


def build_module(name: str) -> Any:
    """`functions/<name>/build.py` (its `build(model_dir)` makes the model); ValueError when absent."""
    try:
        return importlib.import_module(f"functions.{name}.build")
    except ModuleNotFoundError as exc:
        if exc.name != f"functions.{name}.build":
            raise
        raise ValueError(f"function {name!r} has a model but no functions/{name}/build.py") from None


def build_one(model_dir: Path, name: str) -> dict[str, Any]:
    """Build function `name`'s model now (no cache check); print a progress line; return metadata."""
    module = build_module(name)
    print(f"building {name} model ...", end=" ", flush=True)
    started = time.perf_counter()
    metadata: dict[str, Any] = module.build(model_dir)
    print(f"done in {time.perf_counter() - started:.1f} s{_summary(metadata)}", flush=True)
    return metadata


def ensure_models(model_dir: Path, names: list[str] | None = None, force: bool = False) -> None:
    """Build each named function's model (default: all that have one) unless already present."""
    model_dir = Path(model_dir)
    known = function_names()
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"unknown function(s) {', '.join(unknown)} (known: {', '.join(known)})")
    for name in names or model_functions():
        relative = model_file(name)
        if relative is None:
            print(f"{name}: no model to build", flush=True)
            continue
        with _lock(model_dir, name):
            if not force and is_built(model_dir, name):
                print(f"{name} model present: {model_dir / relative}", flush=True)
                continue
            build_one(model_dir, name)


def default_model_dir() -> Path:
    """$ONNXFN_MODEL_DIR, else `<repo>/models`."""
    raw = os.environ.get(PREFIX + "MODEL_DIR")
    return Path(raw) if raw else PROJECT_ROOT / "models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `onnxfn build-models`."""
    parser.add_argument("names", nargs="*", metavar="FUNCTION", help="functions to build (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the model is present")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where models go (default: $ONNXFN_MODEL_DIR or <repo>/models)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `onnxfn build-models`."""
    model_dir: Path = args.model_dir or default_model_dir()
    try:
        ensure_models(model_dir, list(args.names) or None, force=args.force)
    except ValueError as exc:
        print(f"build-models: {exc}", file=sys.stderr)
        return 2
    return 0
