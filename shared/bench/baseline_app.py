"""The plain baseline the targets are measured against: Flask + gunicorn, one `session.run` per request.

Same model and the same model-specific pre/post-processing as the function, but no CloudEvents, no
batching, default-ish settings (one onnxruntime thread per session, spinning off), plain JSON in and
out. Started by the benchmark as `gunicorn -k sync -w 2 'shared.bench.baseline_app:create()'`.
"""

from __future__ import annotations

import os
from typing import Any

import onnxruntime as ort
import orjson
from flask import Flask, Response, request

from shared.config import PROJECT_ROOT
from shared.contract import load_handler, setup_handler


def create() -> Flask:
    name = os.environ["BASELINE_FUNCTION"]
    model_dir = os.environ.get("ONNXFN_MODEL_DIR") or str(PROJECT_ROOT / "models")
    handler = load_handler(name)
    from pathlib import Path

    setup_handler(handler, Path(model_dir))
    assert handler.config.model_file is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(Path(model_dir) / handler.config.model_file), options, providers=["CPUExecutionProvider"]
    )
    output_names = [o.name for o in session.get_outputs()]
    app = Flask("baseline")

    @app.post("/")
    def predict() -> Any:
        data = orjson.loads(request.get_data())
        feeds = handler.preprocess(data)
        outputs = dict(zip(output_names, session.run(output_names, feeds), strict=True))
        result = handler.postprocess({k: v[0] for k, v in outputs.items()}, data)
        return Response(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY), mimetype="application/json")

    @app.get("/ready")
    def ready() -> str:
        return "ok"

    return app
