"""Running a defense's own network in torch (the red team's differentiable twin) or in ONNX
Runtime (the proxy), from artifacts written at fit time.

A defense that owns a network (MagNet's autoencoder, SafetyNet's SVM) writes it twice: an ONNX
file the proxy runs in ONNX Runtime and, for torch modules, a safetensors state dict the red team
differentiates. ``runtime`` params choose which one ``score``/``purify`` uses; parity tests check
they agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file, save_file
from torch import nn

Runtime = Literal["torch", "onnx"]
RUNTIMES = ("torch", "onnx")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str = "input",
                output_name: str = "output", opset: int = 17) -> None:
    """Exports ``module`` (eval mode, batch axis dynamic) to a single self-contained ONNX file."""
    was_training = module.training
    module.eval()
    try:
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset,
            dynamo=False, external_data=False,
        )
    finally:
        module.train(was_training)


def save_weights(module: nn.Module, path: Path) -> None:
    """safetensors state dict (never pickle)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    module.load_state_dict(load_file(str(path)))
    return module.eval()


class OnnxModel:
    """One ONNX Runtime CPU session with a single input; called on torch tensors, returns the
    named output as a float32 torch tensor (no gradient)."""

    def __init__(self, path: Path, output: str | None = None, threads: int = 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in names:
            raise ValueError(f"{path}: no ONNX output {output!r}; outputs: {', '.join(names)}")
        self.output = output or names[0]

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.run_numpy(x.detach().cpu().numpy())
        return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(x.device)
