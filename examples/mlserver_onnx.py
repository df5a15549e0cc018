"""A minimal ONNX Runtime inference runtime for Seldon MLServer, which ships none for ONNX: the
upstream of the bring-your-own example (examples/byo.sh, docs/BYO.md).

``model-settings.json``: ``"implementation": "mlserver_onnx.OnnxModel"`` (this folder on
``PYTHONPATH``) and ``parameters.uri`` naming the ``.onnx`` file. The model's V2 metadata (inputs
and outputs, symbolic dimensions as -1) is read from the graph at load unless the settings give it,
so ``robustgate import --upstream`` can read the signature from MLServer. Every ONNX output is
returned (``logits`` and ``features`` for examples/train_classifier.py's export). Tensors are
``[N, C, H, W]`` FP32 in, ``[N, ...]`` FP32 out.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

DATATYPES = {"tensor(float)": "FP32", "tensor(uint8)": "UINT8", "tensor(int64)": "INT64"}


def _metadata(args) -> list[MetadataTensor]:
    return [MetadataTensor(name=a.name, datatype=DATATYPES.get(a.type, "FP32"),
                           shape=[d if isinstance(d, int) else -1 for d in a.shape]) for a in args]


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self.settings)
        options = ort.SessionOptions()
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 0))  # 0 = ONNX Runtime's default
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        if not self.inputs:
            self.inputs = _metadata(self._session.get_inputs())
        if not self.outputs:
            self.outputs = _metadata(self._session.get_outputs())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise ValueError(f"expected one input tensor, got {len(payload.inputs)}")
        x = self.decode(payload.inputs[0], default_codec=NumpyCodec).astype(np.float32)  # [N, C, H, W]
        names = [o.name for o in self._session.get_outputs()]
        results = self._session.run(names, {self._input: x})
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(names, results)])
