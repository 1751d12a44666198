"""KServe's Python ModelServer with an onnxruntime model (run as `python kserve_app.py`, its own venv).

v1 protocol: `POST /v1/models/model:predict` with `{"instances": [row, ...]}` -> `{"predictions": ...}`;
2 uvicorn workers (KServe's `--workers`), one onnxruntime thread per worker.
"""

import os

import kserve
import numpy as np
import onnxruntime as ort


class OnnxModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session: ort.InferenceSession = ort.InferenceSession(
            self.path, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return True

    # With several workers KServe pickles the model into each worker process: the session is
    # rebuilt there rather than pickled.
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload, headers=None):  # type: ignore[no-untyped-def]
        rows = np.asarray(payload["instances"], dtype=np.float32)
        (out,) = self.session.run(None, {self.input_name: rows})[:1]
        return {"predictions": out.tolist()}


if __name__ == "__main__":
    model = OnnxModel("model", os.environ["BENCH_MODEL"])
    kserve.ModelServer(http_port=int(os.environ["PORT"]), grpc_port=int(os.environ["GRPC_PORT"]), workers=2).start(
        [model]
    )
