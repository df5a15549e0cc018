"""The served path as the red team scores it: the bundle's ONNX graph in ONNX Runtime inside the
very :class:`DefendedModel` the proxy runs, plus the test images attacks start from.

Attacks are *generated* on the torch twin (:mod:`robustgate.attacks.differentiable`) and
*scored* here, so a twin/graph mismatch can only make the red team weaker, never the numbers
rosier than what is served.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from robustgate.defenses.pipeline import DefendedModel, FailurePolicy, Stage
from robustgate.proxy.config import PipelineConfig

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class OnnxClassifier:
    """The bundle's ONNX backbone in an ONNX Runtime CPU session.

    Callable as the pipeline's ``classify`` (``[M, C, H, W]`` -> ``[M, K]`` logits) and usable as
    the detectors' :class:`~robustgate.defenses.base.Classifier` (``features`` needs the graph's
    features output)."""

    def __init__(self, bundle, threads: int = 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        spec = bundle.spec.backbone
        self.session = ort.InferenceSession(str(bundle.path(spec.onnx)), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.logits_output = spec.logits_output
        self.features_output = spec.features_output

    def _run(self, output: str, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self.session.run([output], {self.input_name: arr})
        return torch.from_numpy(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [M, C, H, W] -> [M, K]
        return self._run(self.logits_output, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [M, D]
        if self.features_output is None:
            raise ValueError("this bundle's ONNX backbone exports no features output")
        return self._run(self.features_output, x)


def served_pipeline(bundle, stages: list[Stage], failure_policy: FailurePolicy = "fail-closed",
                    classifier: OnnxClassifier | None = None,
                    max_fanout_items: int | None = PipelineConfig.model_fields["max_fanout_items"].default) -> DefendedModel:
    """The proxy's pipeline object on the bundle's ONNX graph (``max_fanout_items``: as the proxy's
    default ``pipeline.max_fanout_items``)."""
    clf = classifier or OnnxClassifier(bundle)
    return DefendedModel(stages, classify=clf, classifier=clf, failure_policy=failure_policy,
                         max_fanout_items=max_fanout_items)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_test(n: int, offset: int = 0, root: Path = FASHION_MNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST test images from ``offset``: ``[n, 1, 28, 28]`` in [0, 1], ``[n]``."""
    images = _read_idx(root / "t10k-images-idx3-ubyte.gz")[offset: offset + n]
    labels = _read_idx(root / "t10k-labels-idx1-ubyte.gz")[offset: offset + n]
    if len(labels) < n:
        raise ValueError(f"asked for {n} test images from offset {offset}; only {len(labels)} available")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # [n, 1, 28, 28]
    return x, torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_train(n: int, root: Path = FASHION_MNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST training images (tests train tiny models on them)."""
    images = _read_idx(root / "train-images-idx3-ubyte.gz")[:n]
    labels = _read_idx(root / "train-labels-idx1-ubyte.gz")[:n]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
