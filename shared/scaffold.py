"""`onnxfn new NAME --model FILE.onnx`: a new function from an ONNX file, ready for `make run`.

Reads the model's input and output tensors with onnxruntime and writes:
- `functions/NAME/`: `func.py` (a handler declaring those tensors: every input validated by name,
  dtype and shape, every problem listed at once; an example of the right shapes), `build.py` (puts
  the model into `models/NAME/` for `onnxfn build-models` and the image), `model.onnx` (the file);
- `tests/functions/test_NAME.py`: the example through the real model, bad input refused;
- `eventing/400-trigger-NAME.yaml` (requests to the Service, results to a KafkaSink) and
  `eventing/500-kafka-sink-NAME.yaml` (topic `onnxfn.NAME.results`);
- `knative/service-NAME.yaml` and `knative/cpu/service-NAME.yaml` (and the workers' ConfigMaps of
  the eventing YAML), rendered as `onnxfn render` does.

Nothing is overwritten without `--force`. Event types: `dev.onnxfn.NAME.request` / `.result`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

from shared.config import PROJECT_ROOT
from shared.model import TensorSpec, tensor_spec

NAME = re.compile(r"^[a-z][a-z0-9]{0,39}$")  # a Python package and a Knative Service name at once
MAX_BATCH_SIZE = 32


class ScaffoldError(ValueError):
    """Why the function cannot be made from this name or model."""


def model_tensors(model: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs and outputs, as onnxruntime reads them."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a file that is not a model
        raise ScaffoldError(f"{model} is not an ONNX model onnxruntime can load: {exc}") from None
    return [tensor_spec(a) for a in session.get_inputs()], [tensor_spec(a) for a in session.get_outputs()]


def max_batch_size(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> int:
    """Batched runs need a dynamic first axis everywhere; a fixed axis of 1 means one row a run."""
    first = {spec.name: spec.shape[0] if spec.shape else 0 for spec in [*inputs, *outputs]}
    fixed = {name: size for name, size in first.items() if size is not None and size != 1}
    if fixed:
        shown = ", ".join(f"'{n}' ({s})" for n, s in fixed.items())
        raise ScaffoldError(f"every tensor needs a batch axis first (dynamic, or 1); these have none: {shown}")
    return MAX_BATCH_SIZE if all(size is None for size in first.values()) else 1


def _spec_source(spec: TensorSpec) -> str:
    """Source text of one TensorSpec, quoted as the project's formatter writes it."""
    return (
        f"TensorSpec({json.dumps(spec.name)}, np.dtype({json.dumps(spec.dtype.name)}), "
        f"{spec.shape!r}, {json.dumps(spec.onnx_type)})"
    )


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(spec.shape)) + "]"


def func_source(name: str, model_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], batch: int) -> str:
    tensors = "\n".join(f"  input  {s.name}: {s.dtype.name} {_shape(s)}" for s in inputs)
    tensors += "\n" + "\n".join(f"  output {s.name}: {s.dtype.name} {_shape(s)}" for s in outputs)
    wire = '`{"instances": [row]}`\n(answered `{"predictions": [row]}`) or ' if len(inputs) == 1 else "\n"
    return f'''"""{name}: serves {model_name} (scaffolded by `onnxfn new`).

Request data (`dev.onnxfn.{name}.request`): {wire}`{{"inputs": {{name: row}}}}`
(answered `{{"outputs": {{name: row}}}}`), a row being one tensor without its batch axis, as
nested lists. The model's tensors (N: the batch axis):
{tensors}

Edit `postprocess` to shape the result; `preprocess` already refuses any row of the wrong name,
dtype or shape, listing every problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.contract import Batching, FunctionConfig
from shared.generic import TensorHandler
from shared.model import TensorSpec

MODEL_FILE = "{name}/model.onnx"  # under the model directory (`onnxfn build-models` puts it there)
INPUTS = [
{"".join(f"    {_spec_source(s)},{chr(10)}" for s in inputs)}]
OUTPUTS = [
{"".join(f"    {_spec_source(s)},{chr(10)}" for s in outputs)}]


class Handler(TensorHandler):
    def __init__(self) -> None:
        self.config = FunctionConfig(
            name="{name}",
            accepts=("dev.onnxfn.{name}.request",),
            result_types=("dev.onnxfn.{name}.result",),
            model_file=MODEL_FILE,
            batching=Batching(max_batch_size={batch}),
        )
        self.inputs, self.outputs = list(INPUTS), list(OUTPUTS)

    def postprocess(self, outputs: Mapping[str, np.ndarray], data: Any) -> Any:
        return super().postprocess(outputs, data)


def new() -> Handler:
    return Handler()
'''


def build_source(name: str) -> str:
    return f'''"""Put functions/{name}/model.onnx into the model directory (`onnxfn build-models`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from shared.build_models import write_metadata

SOURCE = Path(__file__).resolve().parent / "model.onnx"


def build(model_dir: Path) -> dict[str, Any]:
    started = time.time()
    target = model_dir / "{name}" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCE, target)
    return write_metadata(target, started, {{"source": "functions/{name}/model.onnx"}})
'''


def test_source(name: str) -> str:
    return f'''"""{name} (scaffolded by `onnxfn new`): its example runs through the real model; bad input is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from functions.{name} import new
from shared.errors import InvalidInput
from shared.model import OnnxModel

MODEL = Path(__file__).resolve().parents[2] / "functions" / "{name}" / "model.onnx"


def test_the_example_runs_through_the_model_and_answers_every_output() -> None:
    handler = new()
    model = OnnxModel(MODEL, providers="cpu")
    handler.bind_model(model)  # the model's tensors are the ones the handler declares
    outputs = model.run(handler.preprocess(handler.example()))
    result = handler.postprocess({{name: value[0] for name, value in outputs.items()}}, handler.example())
    assert set(result["outputs"]) == {{spec.name for spec in handler.outputs}}


def test_bad_input_is_refused_with_every_problem() -> None:
    handler = new()
    with pytest.raises(InvalidInput) as caught:
        handler.preprocess({{"inputs": {{"not-an-input": [1]}}}})
    assert len(caught.value.details) == 1 + len(handler.inputs)  # the unknown one, each missing one
'''


def trigger_yaml(name: str) -> str:
    return f"""# Requests for the `{name}` function (scaffolded by `onnxfn new`); its results go to a KafkaSink.
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: {name}
  namespace: default
  annotations:
    kafka.eventing.knative.dev/delivery.order: unordered
    # Embedded plane only (Knative ignores it): waiting events in one batched-CloudEvents request.
    onnxfn.dev/delivery.batch: "32"
spec:
  broker: default
  filter:
    attributes:
      type: dev.onnxfn.{name}.request
  subscriber:
    ref:
      apiVersion: serving.knative.dev/v1
      kind: Service
      name: {name}
      namespace: default
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata:
  name: {name}-results
  namespace: default
spec:
  broker: default
  filter:
    attributes:
      type: dev.onnxfn.{name}.result
  subscriber:
    ref:
      apiVersion: eventing.knative.dev/v1alpha1
      kind: KafkaSink
      name: {name}-results
      namespace: default
"""


def sink_yaml(name: str) -> str:
    return f"""# The `{name}` function's result topic (scaffolded by `onnxfn new`).
apiVersion: eventing.knative.dev/v1alpha1
kind: KafkaSink
metadata:
  name: {name}-results
  namespace: default
spec:
  topic: onnxfn.{name}.results
  bootstrapServers:
    - my-cluster-kafka-bootstrap.kafka:9092
  contentMode: binary
  numPartitions: 4
  replicationFactor: 3
"""


def scaffold(name: str, model: Path, root: Path = PROJECT_ROOT, force: bool = False) -> list[Path]:
    """Write the new function's files under `root`; the paths written."""
    if not NAME.match(name):
        raise ScaffoldError(f"{name!r} is not a function name: lower-case letters and digits, a letter first")
    if not model.is_file():
        raise ScaffoldError(f"no model file {model}")
    inputs, outputs = model_tensors(model)
    batch = max_batch_size(inputs, outputs)
    folder = root / "functions" / name
    texts = {
        folder / "__init__.py": f'"""{name}: serves {model.name} (scaffolded by `onnxfn new`)."""\n\n'
        'from .func import new\n\n__all__ = ["new"]\n',
        folder / "func.py": func_source(name, model.name, inputs, outputs, batch),
        folder / "build.py": build_source(name),
        root / "tests" / "functions" / f"test_{name}.py": test_source(name),
        root / "eventing" / f"400-trigger-{name}.yaml": trigger_yaml(name),
        root / "eventing" / f"500-kafka-sink-{name}.yaml": sink_yaml(name),
    }
    existing = [p for p in [*texts, folder / "model.onnx"] if p.exists()]
    if existing and not force:
        raise ScaffoldError(f"{', '.join(map(str, existing))} already exist (--force replaces them)")
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    shutil.copyfile(model, folder / "model.onnx")
    written = [*texts, folder / "model.onnx"]
    return written + render_services(name, root)


def render_services(name: str, root: Path) -> list[Path]:
    """What `onnxfn render` writes now that the function exists: its Knative Services, and the
    workers' ConfigMaps (they carry the eventing YAML, which gained its Trigger and KafkaSink)."""
    from shared import render

    importlib.invalidate_caches()
    files = render.render_all(root / "knative", eventing=(root / "eventing", root / "workers"))
    written = []
    for path, text in files.items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the function's name: lower-case letters and digits")
    parser.add_argument("--model", type=Path, required=True, help="the ONNX file to serve")
    parser.add_argument("--force", action="store_true", help="replace files a previous `onnxfn new` wrote")


def run(args: argparse.Namespace) -> int:
    try:
        written = scaffold(args.name, args.model, force=args.force)
    except ScaffoldError as exc:
        print(f"new: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path}")
    print(
        f"\nnext: `make run` serves {args.name} (its model goes to models/{args.name}/ first) and "
        f"publishes its example; `make test` runs tests/functions/test_{args.name}.py.\n"
        f"events of type dev.onnxfn.{args.name}.request (data: see functions/{args.name}/func.py) "
        f"answer on the topic onnxfn.{args.name}.results"
    )
    return 0
