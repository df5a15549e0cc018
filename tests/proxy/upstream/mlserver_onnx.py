"""An ONNX Runtime inference runtime for Seldon MLServer (MLServer ships none for ONNX).

Loaded by MLServer from ``model-settings.json`` (``"implementation": "mlserver_onnx.OnnxModel"``,
this folder on ``PYTHONPATH``). ``parameters.uri`` names the ``.onnx`` file; ``parameters.extra``
holds test knobs:

- ``sleep_s`` (float, default 0): sleep this long before answering -- a slow upstream;
- ``fault`` (default ``"none"``): make the answer malformed the way a buggy upstream would:
  ``drop_row`` (one item fewer than sent), ``no_logits`` (only the ``features`` output),
  ``fp64`` (logits as FP64);
- ``intra_op_threads`` (int, default 1);
- ``spinning`` (bool, default true: ONNX Runtime's default): whether the intra-op pool's threads
  busy-wait between operators and after a run (``session.intra_op.allow_spinning``);
- ``cancel_log`` (path, optional): a line is appended there whenever a sleeping request is
  cancelled -- the evidence that a caller's deadline reached this server.

Every ONNX output is returned (``logits`` and, for bundles exported with it, ``features``). The
input is given to the model in the datatype its graph takes (FP32, FP16 or UINT8: the metadata
harness.py writes declares the same).
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

FAULTS = ("none", "drop_row", "no_logits", "fp64")
INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


class OnnxModel(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        self._sleep_s = float(extra.get("sleep_s", 0.0))
        self._fault = extra.get("fault", "none")
        self._cancel_log = extra.get("cancel_log")
        if self._fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self._fault!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if extra.get("spinning", True) else "0")
        uri = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._dtype = INPUT_TYPES[self._session.get_inputs()[0].type]  # what the model takes (its metadata says so)
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise ValueError(f"expected one input tensor, got {len(payload.inputs)}")
        x = self.decode(payload.inputs[0], default_codec=NumpyCodec).astype(self._dtype)  # [M, C, H, W]
        if self._sleep_s:
            try:
                await asyncio.sleep(self._sleep_s)
            except asyncio.CancelledError:
                if self._cancel_log:
                    with open(self._cancel_log, "a") as fh:
                        fh.write(f"cancelled {x.shape[0]} item(s)\n")
                raise
        results = dict(zip(self._outputs, self._session.run(None, {self._input: x})))
        if self._fault == "drop_row":
            results = {k: v[:-1] for k, v in results.items()}
        elif self._fault == "no_logits":
            results.pop("logits")
        elif self._fault == "fp64":
            results["logits"] = results["logits"].astype(np.float64)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in results.items()],
        )
