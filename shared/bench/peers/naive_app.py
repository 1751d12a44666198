"""Naive Flask + gunicorn: what a user writes in ten minutes (run as `gunicorn -w 2 naive_app:app`).

`POST /predict` with `{"instances": [row, ...]}` -> `{"predictions": [...]}`; one `session.run` per
request, one onnxruntime thread per worker (the documented fix for oversubscribed cores).
"""

import os

import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(os.environ["BENCH_MODEL"], options, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
app = Flask(__name__)


@app.post("/predict")
def predict():  # type: ignore[no-untyped-def]
    rows = np.asarray(request.get_json()["instances"], dtype=np.float32)
    (out,) = session.run(None, {input_name: rows})[:1]
    return jsonify(predictions=out.tolist())


@app.get("/ready")
def ready():  # type: ignore[no-untyped-def]
    return "ok"
