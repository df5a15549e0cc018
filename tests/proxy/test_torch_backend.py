"""The torch backend (proxy/backends/torch.py): the bundle's twin as the proxy's classify step.

On bundles/default it serves what the ONNX Runtime backend serves (within float tolerance),
directly and through a real proxy on loopback with tritonclient; the pipeline runner hands it
torch tensors (no numpy round trip); ``robustgate_backend_info`` says which runtime serves. The
CUDA variants (marker ``cuda``; bench/gpu/check.sh runs them on a GPU machine) are skipped here
when torch sees no CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from prometheus_client import generate_latest

from robustgate.models.bundle import Bundle
from robustgate.proxy.backends.onnx import OnnxBackend
from robustgate.proxy.backends.torch import TorchBackend
from robustgate.proxy.config import ConfigError, load_config

from loopback import LoopbackProxy

DEFAULT = Path(__file__).resolve().parents[2] / "bundles" / "default"
HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")]
MAGNET_TORCH = [{"name": "magnet_l1", "kind": "magnet", "action": "reject", "params": {"runtime": "torch"}}]
MAGNET_ONNX = [{"name": "magnet_l1", "kind": "magnet", "action": "reject", "params": {"runtime": "onnx"}}]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(DEFAULT)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """64 Fashion-MNIST test images ``[64, 1, 28, 28]`` and uniform noise ``[16, 1, 28, 28]``, stacked."""
    from robustgate.models.data import load_splits

    x, _ = load_splits("fashion-mnist", val_size=0).take("test", 64, offset=100)
    noise = np.random.default_rng(7).random((16, 1, 28, 28), dtype=np.float32)
    return np.concatenate([x.numpy().astype(np.float32), noise])


def test_torch_backend_answers_what_onnxruntime_answers(bundle, images):
    ort_backend = OnnxBackend(bundle, intra_op_threads=1, inter_op_threads=1)
    backend = TorchBackend(bundle, device="cpu")
    want_logits, want_feats = ort_backend.infer_with_features(images)
    logits, feats = backend.infer_with_features(images)
    assert logits.dtype == np.float32 and logits.shape == want_logits.shape == (80, 10)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(feats, want_feats, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(backend.infer(images), want_logits, atol=1e-4, rtol=1e-4)
    meta = backend.metadata()
    assert meta.inputs[0].shape == (-1, 1, 28, 28) and meta.outputs[0].shape == (-1, 10)
    assert backend.info() == {"kind": "torch", "device": "cpu", "provider": "torch"}
    assert ort_backend.info() == {"kind": "onnxruntime", "device": "cpu", "provider": "CPUExecutionProvider"}
    backend.close()
    assert not backend.ready()


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_returns_float32_close_to_float32(bundle, images, precision):
    full = TorchBackend(bundle, device="cpu").infer(images)
    low = TorchBackend(bundle, device="cpu", precision=precision).infer(images)
    assert low.dtype == np.float32
    assert not np.array_equal(low, full)  # autocast did change the arithmetic
    # the predicted class of the real test images stays (bf16 keeps 8 bits of mantissa)
    assert (low[:64].argmax(1) == full[:64].argmax(1)).mean() >= 0.95


def test_bad_precision_and_device_are_refused_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="backend.precision"):
        load_config(None, environ={}, overrides={"bundle": str(DEFAULT), "backend": {"precision": "int8"}})
    with pytest.raises(ConfigError, match="backend.torch.device"):
        load_config(None, environ={}, overrides={"bundle": str(DEFAULT), "backend": {"kind": "torch",
                                                                                      "torch": {"device": "tpu"}}})


def test_the_runner_hands_the_torch_backend_tensors(bundle, images, monkeypatch):
    """With a torch backend the classify step never goes through numpy: the numpy entry points
    are made to fail, and the pipeline still answers what the ONNX pipeline answers."""
    from robustgate.defenses.assemble import PipelineConfig, build_runner

    backend = TorchBackend(bundle, device="cpu")
    cfg = PipelineConfig(stages=MAGNET_TORCH, seed=1)
    runner = build_runner(cfg, bundle, backend, backend.classifier())

    def no_numpy(*args, **kwargs):
        raise AssertionError("the runner took the numpy path")

    monkeypatch.setattr(backend, "infer", no_numpy)
    monkeypatch.setattr(backend, "infer_with_features", no_numpy)
    got = runner(images)
    ort_backend = OnnxBackend(bundle, intra_op_threads=1, inter_op_threads=1)
    want = build_runner(PipelineConfig(stages=MAGNET_ONNX, seed=1), bundle, ort_backend, None)(images)
    np.testing.assert_allclose(got.logits.numpy(), want.logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.scores["magnet_l1"].numpy(), want.scores["magnet_l1"].numpy(), atol=1e-5, rtol=1e-4)
    assert got.verdict.tolist() == want.verdict.tolist()


def test_the_device_path_packs_the_results_into_one_copy_and_changes_no_answer(bundle, images):
    """The runner's device path (input staging, outputs packed into one tensor for one device->host
    copy, unpacked with their dtypes) run on the CPU under the device name ``cpu:0``: the same
    answers as the host path, radius (smoothing) and scores (detectors) included."""
    from robustgate.defenses.assemble import PipelineConfig, build_runner

    backend = TorchBackend(bundle, device="cpu")
    x = images[:12]
    for stages in ([{"name": "smooth", "kind": "smoothing", "params": {"n0": 8, "n": 16}}],
                   [{"name": "noise", "kind": "noise", "action": "log"}, *MAGNET_TORCH]):
        runner = build_runner(PipelineConfig(stages=stages, seed=2), bundle, backend, backend.classifier())
        want = runner(x)
        runner.device = "cpu:0"  # not "cpu": takes the device path
        for got in (runner(x), runner.prepare(x)(None)):
            assert torch.equal(got.logits, want.logits) and torch.equal(got.verdict, want.verdict)
            assert got.verdict.dtype == want.verdict.dtype == torch.int64
            assert got.scores.keys() == want.scores.keys()
            assert all(torch.equal(got.scores[k], want.scores[k]) for k in got.scores)
            assert (got.radius is None) == (want.radius is None)
            if want.radius is not None:
                assert torch.allclose(got.radius, want.radius, equal_nan=True)


def _serve_and_infer(bundle_dir: Path, pipeline: dict, backend: dict, x: np.ndarray):
    # explain on: the detector scores are answered only to a trusted client (server.explain)
    proxy = LoopbackProxy(bundle_dir, pipeline, {"backend": backend, "server": {"explain": True}})
    try:
        client = tc.InferenceServerClient(proxy.url)
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outputs = [tc.InferRequestedOutput("logits")] + (
            [tc.InferRequestedOutput("robustgate_score_magnet_l1"), tc.InferRequestedOutput("robustgate_verdict")]
            if pipeline.get("stages") else [])
        res = client.infer("default", [inp], outputs=outputs)
        metrics = generate_latest(proxy.server.metrics.registry).decode()
        return res, metrics
    finally:
        proxy.stop()


def _info_line(metrics: str) -> str:
    return next(line for line in metrics.splitlines() if line.startswith("robustgate_backend_info{"))


@pytest.mark.parametrize("stages", [[], "magnet"], ids=["backbone", "magnet"])
def test_a_proxy_on_the_torch_backend_serves_what_the_onnx_proxy_serves(images, stages):
    x = images[:48]  # one request under the 64-item batch limit
    torch_stages, onnx_stages = (MAGNET_TORCH, MAGNET_ONNX) if stages == "magnet" else ([], [])
    got, got_metrics = _serve_and_infer(DEFAULT, {"stages": torch_stages, "seed": 0, "verdict_mode": "item"},
                                        {"kind": "torch", "torch": {"device": "cpu"}}, x)
    want, want_metrics = _serve_and_infer(DEFAULT, {"stages": onnx_stages, "seed": 0, "verdict_mode": "item"},
                                          {"kind": "onnxruntime"}, x)
    np.testing.assert_allclose(got.as_numpy("logits"), want.as_numpy("logits"), atol=1e-4, rtol=1e-4)
    if stages:
        np.testing.assert_allclose(got.as_numpy("robustgate_score_magnet_l1"), want.as_numpy("robustgate_score_magnet_l1"),
                                   atol=1e-5, rtol=1e-4)
        np.testing.assert_array_equal(got.as_numpy("robustgate_verdict"), want.as_numpy("robustgate_verdict"))
    assert _info_line(got_metrics) == 'robustgate_backend_info{device="cpu",kind="torch",provider="torch"} 1.0'
    assert _info_line(want_metrics) == ('robustgate_backend_info{device="cpu",kind="onnxruntime",'
                                        'provider="CPUExecutionProvider"} 1.0')


def test_onnxruntime_on_cuda_falls_back_to_the_twin_and_says_so(bundle, monkeypatch, caplog):
    """Without onnxruntime-gpu, ``backend.onnxruntime.device: cuda`` serves the torch twin; the
    device is stood in for by the CPU here (``resolve_device`` maps cuda to cpu) so that the
    choice itself is tested on a machine without a GPU."""
    from robustgate.defenses import assemble
    from robustgate.proxy.backends import onnx as onnx_backend
    from robustgate.proxy.serve import make_backend

    cfg = load_config(None, environ={}, overrides={"bundle": str(DEFAULT), "backend": {
        "kind": "onnxruntime", "precision": "bfloat16", "onnxruntime": {"device": "cuda"}}})
    monkeypatch.setattr(onnx_backend, "has_cuda_provider", lambda: False)
    monkeypatch.setattr(assemble, "resolve_device", lambda d: "cpu" if d in ("cuda", "auto") else d)
    with caplog.at_level("WARNING", logger="robustgate.proxy"):
        backend = make_backend(cfg, bundle)
    assert isinstance(backend, TorchBackend) and backend.precision == "bfloat16"
    assert backend.info()["provider"] == "torch (onnxruntime has no CUDA provider)"
    assert any("no CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    cpu = make_backend(load_config(None, environ={}, overrides={"bundle": str(DEFAULT)}), bundle)
    assert isinstance(cpu, OnnxBackend)  # the default stays ONNX Runtime on the CPU


@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a machine without a CUDA device")
def test_cuda_without_a_cuda_device_is_a_clear_error(bundle):
    from robustgate.proxy.serve import make_backend

    for backend in ({"kind": "torch", "torch": {"device": "cuda"}}, {"kind": "onnxruntime", "onnxruntime": {"device": "cuda"}}):
        cfg = load_config(None, environ={}, overrides={"bundle": str(DEFAULT), "backend": backend})
        with pytest.raises(ValueError, match="cuda"):
            make_backend(cfg, bundle)


# ---- on a GPU (bench/gpu/check.sh) -------------------------------------------------------------
@pytest.mark.parametrize("precision,atol", [("float32", 2e-2), ("bfloat16", None)])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_torch_backend_answers_what_onnxruntime_answers(bundle, images, precision, atol):
    want = OnnxBackend(bundle, intra_op_threads=1, inter_op_threads=1).infer(images)
    backend = TorchBackend(bundle, device="cuda", precision=precision)
    assert backend.info()["device"] == "cuda" and next(backend.module.parameters()).is_cuda
    got = backend.infer(images)
    if atol is not None:  # cuDNN may run float32 convolutions in TF32 (10-bit mantissa): not 1e-4
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-2)
    assert (got[:64].argmax(1) == want[:64].argmax(1)).mean() >= 0.95
    t = backend.infer_tensor(torch.from_numpy(images).cuda())
    assert t.is_cuda and t.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_runner_keeps_the_batch_on_the_device_and_answers_what_the_cpu_answers(bundle, images, monkeypatch):
    from robustgate.defenses.assemble import PipelineConfig, build_runner

    backend = TorchBackend(bundle, device="cuda")
    runner = build_runner(PipelineConfig(stages=MAGNET_TORCH, device="cuda", seed=1), bundle, backend,
                          backend.classifier())
    monkeypatch.setattr(backend, "infer", lambda *a, **k: pytest.fail("numpy path taken"))
    monkeypatch.setattr(backend, "infer_with_features", lambda *a, **k: pytest.fail("numpy path taken"))
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (copies.append(tuple(self.shape)), real_cpu(self, *a, **k))[1])
    got = runner(images)
    assert copies == [(80, 10 + 1 + 1)]  # one device->host copy: logits, verdict and the MagNet score packed
    assert got.logits.device.type == "cpu" and got.verdict.dtype == torch.int64
    monkeypatch.undo()
    want = build_runner(PipelineConfig(stages=MAGNET_ONNX, seed=1), bundle,
                        OnnxBackend(bundle, intra_op_threads=1, inter_op_threads=1), None)(images)
    np.testing.assert_allclose(got.logits.numpy(), want.logits.numpy(), atol=2e-2, rtol=1e-2)  # TF32, as above
    np.testing.assert_allclose(got.scores["magnet_l1"].numpy(), want.scores["magnet_l1"].numpy(), atol=1e-2, rtol=1e-2)
    assert (got.verdict == want.verdict).float().mean() >= 0.97  # TF32 may move a score across the threshold


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_proxy_with_onnxruntime_on_cuda_serves_the_twin_and_says_so(images):
    from robustgate.proxy.backends.onnx import has_cuda_provider

    x = images[:48]
    got, metrics = _serve_and_infer(DEFAULT, {"stages": MAGNET_TORCH, "device": "cuda", "seed": 0, "verdict_mode": "item"},
                                    {"kind": "onnxruntime", "onnxruntime": {"device": "cuda"}}, x)
    want, _ = _serve_and_infer(DEFAULT, {"stages": MAGNET_ONNX, "seed": 0, "verdict_mode": "item"}, {"kind": "onnxruntime"}, x)
    np.testing.assert_allclose(got.as_numpy("logits"), want.as_numpy("logits"), atol=2e-2, rtol=1e-2)
    provider = "CUDAExecutionProvider" if has_cuda_provider() else "torch (onnxruntime has no CUDA provider)"
    assert f'device="cuda"' in _info_line(metrics) and f'provider="{provider}"' in _info_line(metrics)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_diffusion_purifier_draws_its_noise_on_the_device(bundle, images):
    """The runner's generator lives on the pipeline's device: the diffusion purifier (and every
    stage that draws noise with ``device=x.device``) runs on cuda, seeded runs repeat, and the
    purified test images are still mostly classified right."""
    from robustgate.defenses.assemble import PipelineConfig, build_runner
    from robustgate.models.data import load_splits

    backend = TorchBackend(bundle, device="cuda")
    stages = [{"name": "diffusion", "kind": "diffusion", "action": "log", "params": {"runtime": "torch"}}]
    runner = build_runner(PipelineConfig(stages=stages, device="cuda", seed=5), bundle, backend, backend.classifier())
    assert runner.generator().device.type == "cuda"
    a, b = runner(images[:64]), runner(images[:64])
    np.testing.assert_array_equal(a.logits.numpy(), b.logits.numpy())
    _, y = load_splits("fashion-mnist", val_size=0).take("test", 64, offset=100)
    assert (a.logits.argmax(1) == y).float().mean() >= 0.7


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_fp16_model_imports_and_answers_on_the_gpu(tmp_path):
    """A model converted to FP16, as GPU deployments hold it (robustgate import casts at its edges;
    its torch twin is the graph in FP32): on the GPU the torch backend, and ONNX Runtime's FP16 kernels
    where onnxruntime-gpu is installed, answer what the CPU answers, to FP16's precision."""
    import onnxruntime as ort
    from torch import nn

    from robustgate.models.importer import import_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval().half()
    src = tmp_path / "half.onnx"
    torch.onnx.export(net, (torch.rand(2, 3, 32, 32).half(),), str(src), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    bundle = import_onnx(src, tmp_path / "b")
    assert bundle.spec.backbone.recipe["precision"] == "fp16"
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    want = OnnxBackend(bundle).infer(x)
    tol = 1e-2 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(TorchBackend(bundle, device="cuda").infer(x), want, atol=tol)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        np.testing.assert_allclose(OnnxBackend(bundle, device="cuda").infer(x), want, atol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_uint8_model_rounds_onto_its_levels_on_the_gpu(tmp_path):
    """A model that takes UINT8 levels (robustgate import puts the rounding in front; its twin passes
    it straight through): on the GPU the torch backend rounds the pixels onto the levels before the
    twin, so pixels between levels get exactly the answer of the levels they round to, and the CPU's
    ONNX Runtime answer."""
    from torch import nn

    from robustgate.models.importer import import_onnx

    class Levels(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(8, 10))

        def forward(self, x):
            return self.net(x.float() / 255)

    torch.manual_seed(0)
    src = tmp_path / "levels.onnx"
    torch.onnx.export(Levels().eval(), ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8),), str(src),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    bundle = import_onnx(src, tmp_path / "b")
    assert bundle.spec.backbone.recipe["input_datatype"] == "uint8"
    rng = np.random.default_rng(0)
    on = (rng.integers(0, 256, (16, 3, 32, 32)) / np.float32(255.0)).astype(np.float32)
    between = np.clip(on + rng.uniform(-0.49, 0.49, on.shape).astype(np.float32) / 255, 0, 1)
    gpu = TorchBackend(bundle, device="cuda")
    np.testing.assert_array_equal(gpu.infer(between), gpu.infer(on))
    np.testing.assert_allclose(gpu.infer(between), OnnxBackend(bundle).infer(between), atol=1e-4)
