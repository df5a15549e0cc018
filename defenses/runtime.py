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


def export_onnx(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: Path,
                input_name: str | tuple[str, ...] = "input", output_name: str = "output", opset: int = 17,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Exports ``module`` (eval mode, batch axis dynamic) to a single self-contained ONNX file.

    ``example`` / ``input_name`` may be tuples for a module with several inputs (each input's
    first axis is the batch); ``dynamic_axes`` replaces the batch-only default for the names it
    lists (e.g. ``{"input": {0: "batch", 2: "height", 3: "width"}}``)."""
    examples = example if isinstance(example, tuple) else (example,)
    names = list(input_name) if isinstance(input_name, tuple) else [input_name]
    if len(names) != len(examples):
        raise ValueError(f"export_onnx: {len(examples)} example input(s) but {len(names)} input name(s)")
    was_training = module.training
    module.eval()
    try:
        torch.onnx.export(
            module, examples, str(path), input_names=names, output_names=[output_name],
            dynamic_axes={**{n: {0: "batch"} for n in [*names, output_name]}, **(dynamic_axes or {})},
            opset_version=opset,
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
    """One ONNX Runtime CPU session; called on torch tensors (its first input), returns the named
    output as a float32 torch tensor (no gradient). ``run_feeds`` serves graphs with several inputs.

    ``threads``: intra-op threads (0 = ONNX Runtime's default); ``spin=False`` stops idle worker
    threads from busy-waiting, which helps on a CPU shared with other processes."""

    def __init__(self, path: Path, output: str | None = None, threads: int = 1, spin: bool = True):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in names:
            raise ValueError(f"{path}: no ONNX output {output!r}; outputs: {', '.join(names)}")
        self.output = output or names[0]

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The named output for the given ``{input name: array}`` feeds."""
        return self.session.run([self.output], feeds)[0]

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.run_numpy(x.detach().cpu().numpy())
        return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(x.device)
