"""A query oracle over the live proxy: Open Inference Protocol ModelInfer via tritonclient.grpc.

What a black-box attacker (or an operator's probe) sees: one ModelInfer per item (in the default
``request`` verdict mode a single rejected item fails the whole request, so batching queries
would leak nothing more and lose answers). Every answer is read as a :class:`Reply`:

- ``accepted`` / ``flagged``: logits came back (``robustgate_verdict`` 0 / 1 when declared);
- ``rejected``: PERMISSION_DENIED ``rejected by robustgate: item <i> stage <name> ...`` -- the
  item was rejected by the named stage; no logits (in ``item`` verdict mode: verdict 2, the stage
  from the ``robustgate_reasons`` parameter);
- ``blocked``: any other PERMISSION_DENIED or RESOURCE_EXHAUSTED -- the proxy refuses this
  *client* (a stateful detector's block, a per-client budget or rate limit); no logits;
- ``overloaded``: RESOURCE_EXHAUSTED ``queue full: ...`` from the batcher's admission: the
  query never ran; :meth:`GrpcOracle.ask` retries it after a pause (``overload_retries``).

Any other error is raised. An identity (``headers``: e.g. ``{"x-client-id": "a1"}`` or
``{"authorization": "Bearer <token>"}``) is sent with every call, so several oracles on one URL
are several clients to the proxy (the Sybil attacker of attacks/endpoint_redteam.py).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from robustgate.attacks.channel import Channel
from robustgate.models.client_values import ClientValues
from robustgate.proxy.codec import REASONS_PARAM

REJECTED_STATUS = "StatusCode.PERMISSION_DENIED"
EXHAUSTED_STATUS = "StatusCode.RESOURCE_EXHAUSTED"
# "stage X failed": the failure policy's rejection (fail-closed), not a detection by X; kept whole
_REJECTION = re.compile(r"rejected by robustgate: item \d+ stage (\S+(?: failed)?)")
_STAGE = re.compile(r"\bstage (\S+)")
OUTCOMES = ("accepted", "flagged", "rejected", "blocked")


@dataclass(frozen=True)
class Reply:
    """One answer as the client sees it. ``logits`` ``[K]`` float32 or None (refused);
    ``outcome`` one of :data:`OUTCOMES`; ``stage`` the rejecting stage's name when the proxy names
    one (``"X failed"`` when stage X failed and the failure policy rejected: no detection by X);
    ``code`` / ``message`` the gRPC status of a refusal."""

    outcome: str
    logits: np.ndarray | None = None
    stage: str | None = None
    code: str | None = None
    message: str | None = None

    @property
    def refused(self) -> bool:
        return self.logits is None


def classify_refusal(status: str, message: str) -> Reply | None:
    """A gRPC error status and message -> the :class:`Reply` it means, or None when it is not a
    refusal (an error the caller should raise) or a transient overload (``queue full``)."""
    message = message or ""
    if status == REJECTED_STATUS and (m := _REJECTION.search(message)):
        return Reply("rejected", stage=m.group(1), code=status, message=message)
    if status == EXHAUSTED_STATUS and "queue full" in message:
        return None
    if status in (REJECTED_STATUS, EXHAUSTED_STATUS):
        m = _STAGE.search(message)
        return Reply("blocked", stage=m.group(1) if m else None, code=status, message=message)
    return None


class GrpcOracle:
    """``url``: ``HOST:PORT`` of the proxy; ``model``: the served model name (None: the only
    model the server's metadata names is not discoverable in OIP, so it must be given);
    ``headers``: gRPC metadata sent with every inference (the client's identity); ``channel``: TLS and
    a bearer token (:class:`Channel`); ``client_values``:
    the served model's clients send ``(pixels - mean) / std`` or BGR (its bundle's ``input``,
    models/client_values.py; the protocol's metadata cannot say so), so queries -- RGB pixels, as
    attacks make them -- are sent so."""

    def __init__(self, url: str, model: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None,
                 overload_retries: int = 20, overload_pause_s: float = 0.05,
                 client_values: ClientValues | None = None, channel: Channel | None = None):
        channel = channel or Channel()
        self.client = grpcclient.InferenceServerClient(url=url, **channel.client_kwargs())
        self.client_values = client_values
        self.model = model
        self.timeout_s = timeout_s
        self.headers = {**channel.headers(), **(headers or {})}  # an identity's own token wins
        self.overload_retries, self.overload_pause_s = overload_retries, overload_pause_s
        meta = self.client.get_model_metadata(model, as_json=True, headers=self.headers or None)
        self.input_name = meta["inputs"][0]["name"]
        self.input_dims = [int(d) for d in meta["inputs"][0].get("shape", [])[1:]]  # per item, as the server takes it
        outputs = [o["name"] for o in meta["outputs"] if not o["name"].startswith("robustgate_")]
        if not outputs:
            raise ValueError(f"model {model!r} at {url} declares no logits output: {meta['outputs']}")
        self.output_name = outputs[0]
        self.verdict_output = next((o["name"] for o in meta["outputs"] if o["name"] == "robustgate_verdict"), None)
        self.queries = 0  # inference calls answered (overload refusals, retried, not included)
        self.rejections = 0  # refused: rejected or blocked
        self.overloads = 0

    def ask(self, x: torch.Tensor) -> Reply:
        """``x`` ``[C, H, W]`` -> the proxy's :class:`Reply` (one query; sent ``[1, H, W, C]`` when the
        served model declares its input channels last)."""
        arr = x.detach().cpu().numpy()[None]
        if self.client_values is not None:
            arr = self.client_values.values(arr)
        if self.channels_last(arr.shape[1:]):
            arr = arr.transpose(0, 2, 3, 1)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        inp = grpcclient.InferInput(self.input_name, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        outs = [grpcclient.InferRequestedOutput(self.output_name)]
        if self.verdict_output is not None:
            outs.append(grpcclient.InferRequestedOutput(self.verdict_output))
        for attempt in range(self.overload_retries + 1):
            try:
                res = self.client.infer(self.model, [inp], outputs=outs, client_timeout=self.timeout_s,
                                        headers=self.headers or None)
            except InferenceServerException as exc:
                reply = classify_refusal(str(exc.status()), exc.message())
                if reply is None and str(exc.status()) == EXHAUSTED_STATUS and attempt < self.overload_retries:
                    self.overloads += 1
                    time.sleep(self.overload_pause_s * (attempt + 1))
                    continue
                if reply is None:
                    raise
                self.queries += 1
                self.rejections += 1
                return reply
            self.queries += 1
            verdict = int(res.as_numpy(self.verdict_output).reshape(-1)[0]) if self.verdict_output is not None else 0
            if verdict == 2:  # item verdict mode: a rejected item is answered, with NaN logits
                self.rejections += 1
                reasons = res.get_response().parameters[REASONS_PARAM].string_param.split(",")
                stage = reasons[0] if reasons and reasons[0] else None  # "X failed" kept, as in request mode
                return Reply("rejected", stage=stage)
            return Reply("flagged" if verdict == 1 else "accepted", logits=res.as_numpy(self.output_name).reshape(-1))
        raise AssertionError("unreachable: the retry loop returns or raises")

    def channels_last(self, chw: tuple[int, int, int]) -> bool:
        """Whether the server takes an item of shape ``chw`` (C, H, W) as ``[H, W, C]``: its declared
        input says so and not ``[C, H, W]`` (robustgate's ModelMetadata for an NHWC bundle)."""
        c, h, w = chw
        return self.input_dims == [h, w, c] and self.input_dims != [c, h, w]

    def answer(self, x: torch.Tensor) -> tuple[np.ndarray | None, int]:
        """``x`` ``[C, H, W]`` -> (logits ``[K]`` or None when refused, verdict 0/1/2).

        The verdict is the proxy's ``robustgate_verdict`` output when the model declares it
        (0 accepted, 1 flagged), 2 for a refusal (rejected or blocked)."""
        reply = self.ask(x)
        return reply.logits, {"accepted": 0, "flagged": 1}.get(reply.outcome, 2)

    def query_one(self, x: torch.Tensor) -> np.ndarray | None:
        """``x`` ``[C, H, W]`` -> logits ``[K]``, or None when the proxy refused it."""
        return self.answer(x)[0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, C, H, W]`` -> (logits ``[M, K]``, NaN rows where refused; refused ``[M]``)."""
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
