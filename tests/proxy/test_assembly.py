"""Pipeline assembly from bundle + config: fitted defenses supply params and threshold; an
ensemble stage (real randomized smoothing) adds the certified radius output; seeded runs repeat."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from robustgate.models.bundle import Bundle, DefenseSpec
from robustgate.proxy.config import load_config
from robustgate.proxy.serve import build_server

BRIGHT = np.full((1, 1, 28, 28), 0.8, np.float32)
DARK = np.full((1, 1, 28, 28), 0.2, np.float32)


def infer(url, x):
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return tc.InferenceServerClient(url).infer("tiny", [inp])


@pytest.fixture(scope="module")
def fitted_bundle(proxy_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("fitted") / "tiny"
    shutil.copytree(proxy_bundle, root)
    b = Bundle.load(root).with_defense("brightness", DefenseSpec(kind="test_proxy_mean", threshold=0.5))
    b.save()
    return root


def test_stage_takes_threshold_from_the_bundles_fitted_defense(start_proxy, fitted_bundle):
    # explain on (a trusted client's view): the rejection names the threshold the stage used
    p = start_proxy(bundle=str(fitted_bundle), pipeline={"stages": [{"name": "brightness", "kind": "test_proxy_mean"}]},
                    server={"explain": True})
    assert infer(p.url, DARK).as_numpy("robustgate_verdict").tolist() == [0]
    with pytest.raises(InferenceServerException) as err:
        infer(p.url, BRIGHT)
    assert err.value.status() == "StatusCode.PERMISSION_DENIED" and "threshold 0.5" in err.value.message()


def test_kind_mismatch_with_the_bundle_is_refused(fitted_bundle):
    cfg = load_config(None, environ={}, overrides={
        "bundle": str(fitted_bundle), "pipeline": {"stages": [{"name": "brightness", "kind": "jpeg"}]}})
    with pytest.raises(ValueError, match=r"pipeline.stages.0 \(brightness\).*'test_proxy_mean'"):
        build_server(cfg)


def test_detector_without_threshold_is_refused_unless_it_only_logs(proxy_bundle):
    cfg = load_config(None, environ={}, overrides={
        "bundle": str(proxy_bundle), "pipeline": {"stages": [{"name": "m", "kind": "test_proxy_mean"}]}})
    with pytest.raises(ValueError, match="no calibrated threshold"):
        build_server(cfg)


def test_smoothing_ensemble_answers_radius_and_seeded_runs_repeat(start_proxy):
    p = start_proxy(pipeline={
        "stages": [{"name": "smooth", "kind": "smoothing", "params": {"sigma": 0.25, "n0": 4, "n": 16, "alpha": 0.01}}],
        "verdict_mode": "item", "seed": 7,
    })
    x = np.random.default_rng(3).random((3, 1, 28, 28), dtype=np.float32)
    a, b = infer(p.url, x), infer(p.url, x)
    names = [o.name for o in a.get_response().outputs]
    assert names == ["logits", "robustgate_verdict", "robustgate_radius"]
    verdict, radius, logits = a.as_numpy("robustgate_verdict"), a.as_numpy("robustgate_radius"), a.as_numpy("logits")
    assert radius.shape == (3,) and logits.shape == (3, 10)
    for v, r, row in zip(verdict, radius, logits):
        if v == 2:  # abstained: rejected, logits withheld
            assert np.isnan(row).all()
        else:
            assert v == 0 and r >= 0 and np.isfinite(row).all()
    np.testing.assert_array_equal(verdict, b.as_numpy("robustgate_verdict"))
    np.testing.assert_array_equal(radius, b.as_numpy("robustgate_radius"))
    # the classify stage ran once per request on the N*(n0+n) noisy copies
    reg = p.server.metrics.registry
    assert reg.get_sample_value("robustgate_batch_size_sum") == 6
    assert reg.get_sample_value("robustgate_stage_duration_seconds_count", {"stage": "smooth"}) == 2


def test_a_runners_front_half_and_finish_in_two_threads_give_what_one_call_gives(proxy_bundle):
    """The batcher runs ``prepare`` and its ``finish`` in different threads (proxy/batcher.py,
    "Front halves"): same logits, verdicts and scores as the runner called whole, same seed."""
    from concurrent.futures import ThreadPoolExecutor

    from robustgate.defenses.assemble import build_runner
    from robustgate.proxy.backends.onnx import OnnxBackend
    from robustgate.proxy.config import PipelineConfig

    bundle = Bundle.load(proxy_bundle)
    cfg = PipelineConfig(seed=11, stages=[
        {"name": "median", "kind": "median"}, {"name": "noise", "kind": "noise", "params": {"sigma": 0.2}}])
    runner = build_runner(cfg, bundle, OnnxBackend(bundle), None)
    assert runner.has_purifiers
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    whole = runner(x, None)
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        finish = a.submit(runner.prepare, x).result()
        split = b.submit(finish, None).result()
    np.testing.assert_array_equal(split.logits.numpy(), whole.logits.numpy())
    assert split.verdict.tolist() == whole.verdict.tolist() and split.reason == whole.reason
    assert set(split.seconds) == set(whole.seconds) == {"median", "noise", "classify"}
    assert not build_runner(PipelineConfig(), bundle, OnnxBackend(bundle), None).has_purifiers


# ---- device (defenses/assemble.py, "Device") --------------------------------------------------
CUDA = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")


class _DeviceSpy:
    """Records the devices the assembly moves a stage to (wraps the registered defense's ``to``)."""

    def __init__(self, monkeypatch):
        from robustgate.defenses.base import Defense

        self.moves: list[tuple[str, str]] = []
        original = Defense.to

        def to(defense, device):
            self.moves.append((defense.kind, str(device)))
            return original(defense, device)

        monkeypatch.setattr(Defense, "to", to)


def test_device_is_validated_and_resolved_once(proxy_bundle):
    import torch

    from robustgate.defenses.assemble import PipelineConfig, build_stages, resolve_device
    from robustgate.proxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline\.device: Input should be 'cpu', 'cuda' or 'auto'"):
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "pipeline": {"device": "gpu"}})
    with pytest.raises(ConfigError, match=r"pipeline\.stages\.0\.device: Input should be"):
        load_config(None, environ={}, overrides={"bundle": str(proxy_bundle), "pipeline": {
            "stages": [{"name": "m", "kind": "median", "device": "tpu"}]}})
    assert load_config(None, environ={"ROBUSTGATE_PIPELINE__DEVICE": "auto"},
                       overrides={"bundle": str(proxy_bundle)}).pipeline.device == "auto"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"pipeline\.stages\.0 \(m\): device is 'cuda' but torch sees no CUDA"):
            build_stages(PipelineConfig(device="cuda", stages=[{"name": "m", "kind": "median"}]), Bundle.load(proxy_bundle))


def test_stages_go_to_the_pipeline_device_unless_they_override_it(proxy_bundle, monkeypatch):
    import torch

    from robustgate.defenses.assemble import PipelineConfig, build_runner, build_stages
    from robustgate.proxy.backends.onnx import OnnxBackend

    bundle = Bundle.load(proxy_bundle)
    spy = _DeviceSpy(monkeypatch)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PipelineConfig(device="auto", stages=[{"name": "m", "kind": "median"},
                                                {"name": "n", "kind": "noise", "params": {"sigma": 0.1}, "device": "cpu"}])
    build_stages(cfg, bundle)
    assert dict(spy.moves) == {"median": auto, "noise": "cpu"}  # where each stage was moved last
    spy.moves.clear()
    build_stages(cfg, bundle, twin=True, device="cpu")  # eval's --device overrides the pipeline's, not a stage's
    assert dict(spy.moves) == {"median": "cpu", "noise": "cpu"}
    assert build_runner(cfg, bundle, OnnxBackend(bundle), None).device == auto


def test_host_only_stages_are_named(proxy_bundle):
    from robustgate.defenses.assemble import PipelineConfig, build_stages, host_only

    stages = build_stages(PipelineConfig(stages=[{"name": "j", "kind": "jpeg"}, {"name": "m", "kind": "median"}]),
                          Bundle.load(proxy_bundle))
    assert "Pillow" in host_only(stages[0].defense) and host_only(stages[1].defense) is None


@CUDA
def test_a_cuda_pipeline_answers_what_the_cpu_pipeline_answers_and_logs_host_stages_once(proxy_bundle, caplog):
    from robustgate.defenses.assemble import PipelineConfig, build_runner
    from robustgate.proxy.backends.onnx import OnnxBackend

    bundle = Bundle.load(proxy_bundle)
    stages = [{"name": "bits", "kind": "bitdepth", "params": {"bits": 4}}, {"name": "median", "kind": "median"},
              {"name": "jpeg", "kind": "jpeg"}]
    backend = OnnxBackend(bundle)
    with caplog.at_level("WARNING", logger="robustgate.assemble"):
        gpu = build_runner(PipelineConfig(stages=stages, device="cuda", seed=3), bundle, backend, None)
    assert [r.getMessage() for r in caplog.records if "compute on the host" in r.getMessage()] == [
        "stages that compute on the host, not on cuda: jpeg (encodes with Pillow on the host (the batch is copied "
        "there and back))"]
    cpu = build_runner(PipelineConfig(stages=stages, seed=3), bundle, backend, None)
    x = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    a, b = gpu(x), cpu(x)
    assert a.logits.device.type == "cpu" and a.verdict.tolist() == b.verdict.tolist()
    np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), atol=1e-4)
