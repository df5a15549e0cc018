"""A query oracle over the live proxy: Open Inference Protocol ModelInfer via tritonclient.grpc.

What a black-box attacker (or an operator's probe) sees: one ModelInfer per item (in the default
``request`` verdict mode a single rejected item fails the whole request, so batching queries
would leak nothing more and lose answers). A rejection arrives as gRPC PERMISSION_DENIED and
counts as a failed query with no logits; any other error is raised.
"""

from __future__ import annotations

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

REJECTED_STATUS = "StatusCode.PERMISSION_DENIED"


class GrpcOracle:
    """``url``: ``HOST:PORT`` of the proxy; ``model``: the served model name (None: the only
    model the server's metadata names is not discoverable in OIP, so it must be given)."""

    def __init__(self, url: str, model: str, timeout_s: float = 30.0):
        self.client = grpcclient.InferenceServerClient(url=url)
        self.model = model
        self.timeout_s = timeout_s
        meta = self.client.get_model_metadata(model, as_json=True)
        self.input_name = meta["inputs"][0]["name"]
        outputs = [o["name"] for o in meta["outputs"] if not o["name"].startswith("robustgate_")]
        if not outputs:
            raise ValueError(f"model {model!r} at {url} declares no logits output: {meta['outputs']}")
        self.output_name = outputs[0]
        self.verdict_output = next((o["name"] for o in meta["outputs"] if o["name"] == "robustgate_verdict"), None)
        self.queries = 0
        self.rejections = 0

    def answer(self, x: torch.Tensor) -> tuple[np.ndarray | None, int]:
        """``x`` ``[C, H, W]`` -> (logits ``[K]`` or None when rejected, verdict 0/1/2).

        The verdict is the proxy's ``robustgate_verdict`` output when the model declares it
        (0 accepted, 1 flagged), 2 for a PERMISSION_DENIED rejection."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy()[None], dtype=np.float32)
        inp = grpcclient.InferInput(self.input_name, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        outs = [grpcclient.InferRequestedOutput(self.output_name)]
        if self.verdict_output is not None:
            outs.append(grpcclient.InferRequestedOutput(self.verdict_output))
        self.queries += 1
        try:
            res = self.client.infer(self.model, [inp], outputs=outs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            if exc.status() == REJECTED_STATUS:
                self.rejections += 1
                return None, 2
            raise
        verdict = int(res.as_numpy(self.verdict_output).reshape(-1)[0]) if self.verdict_output is not None else 0
        return res.as_numpy(self.output_name).reshape(-1), verdict

    def query_one(self, x: torch.Tensor) -> np.ndarray | None:
        """``x`` ``[C, H, W]`` -> logits ``[K]``, or None when the proxy rejected it."""
        return self.answer(x)[0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, C, H, W]`` -> (logits ``[M, K]``, NaN rows where rejected; rejected ``[M]``)."""
        answers = [self.query_one(item) for item in x]
        k = next((len(a) for a in answers if a is not None), 1)
        logits = torch.full((len(x), k), float("nan"))
        rejected = torch.zeros(len(x), dtype=torch.bool)
        for i, a in enumerate(answers):
            if a is None:
                rejected[i] = True
            else:
                logits[i] = torch.from_numpy(a.astype(np.float32))
        return logits, rejected

    def close(self) -> None:
        self.client.close()
