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
    p = start_proxy(bundle=str(fitted_bundle), pipeline={"stages": [{"name": "brightness", "kind": "test_proxy_mean"}]})
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
