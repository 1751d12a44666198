"""One raw onnxruntime measurement in its own interpreter: `python -m shared.bench.raw MODEL BATCH THREADS SECONDS`.

Prints the rows per second of `session.run` on zeros of the model's input shape (dynamic axes 1,
the batch axis BATCH), after one warm-up run. `onnxfn bench --peers` starts one or several at once.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def rows_per_second(model: str, batch: int, threads: int, seconds: float) -> float:
    import onnxruntime as ort

    from shared.model import ONNX_DTYPES

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if threads > 1 else "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {}
    for arg in session.get_inputs():
        shape = [batch, *(d if isinstance(d, int) else 1 for d in arg.shape[1:])]
        feeds[arg.name] = np.zeros(shape, ONNX_DTYPES.get(arg.type, np.dtype(np.float32)))
    session.run(None, feeds)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feeds)
        runs += 1
    return runs * batch / (time.perf_counter() - started)


if __name__ == "__main__":
    path, batch, threads, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    print(f"{rows_per_second(path, batch, threads, seconds):.1f}")
