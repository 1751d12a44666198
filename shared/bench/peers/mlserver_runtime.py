"""MLServer custom runtime for an ONNX file (MLServer has no ONNX runtime of its own).

Served with adaptive batching on (`max_batch_size` 32, `max_batch_time` 1 ms, set in the model's
settings by the bench), V2 protocol: `POST /v2/models/model/infer`.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (out,) = self._session.run(None, {self._input: rows})[:1]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, out)])
