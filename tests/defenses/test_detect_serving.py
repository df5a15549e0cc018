"""MagNet served by the real proxy (grpc.aio on loopback) and queried with tritonclient: a bundle
fitted by `robustgate fit` code, the detector run in ONNX Runtime inside the proxy; the served
verdicts and scores must match the torch twin offline. Clean test images below the threshold are
accepted; PGD (eps 0.1) adversarials above it are rejected with PERMISSION_DENIED naming the
detector, score and threshold; in flag mode the prediction comes back with the verdict."""

from __future__ import annotations

import re
import shutil

import grpc
import numpy as np
import pytest
import torch
import torchattacks
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from robustgate.defenses.base import build
from robustgate.defenses.cli import fit_defense, load_splits
from robustgate.models.bundle import Bundle
from robustgate.models.twin import TorchClassifier, load_backbone

from loopback import LoopbackProxy

STAGE = "magnet"


def infer(url, model, x):
    client = tc.InferenceServerClient(url)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return client.infer(model, [inp])


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    """A fitted bundle, and the clean/adversarial items the torch twin says fall below/above the
    calibrated threshold."""
    root = tmp_path_factory.mktemp("serving") / "bundle"
    shutil.copytree(tiny_bundle, root)
    splits = load_splits(n_train=2000, n_val=500, n_test=500)
    fit_defense(root, "magnet", name=STAGE, params={"width": 16, "epochs": 4, "batch_size": 32, "lr": 3e-3}, target_fpr=0.05,
                splits=splits, log=lambda *_: None)
    bundle = Bundle.load(root)
    spec = bundle.defense(STAGE)
    det = build(spec.kind, **spec.params)
    det.load_artifacts({r: bundle.path(a) for r, a in spec.files.items()})
    module = load_backbone(bundle)
    clf = TorchClassifier(module)
    x, y = splits["test"][0][:128], splits["test"][1][:128]
    adv = torchattacks.PGD(module, eps=0.1, alpha=0.01, steps=20, random_start=True)(x, y).detach()
    with torch.no_grad():
        s_clean, s_adv = det.score(x, clf), det.score(adv, clf)
    clean_ok = x[s_clean < spec.threshold * 0.999][:8]  # margin: float differences ORT vs torch
    adv_hit = adv[s_adv > spec.threshold * 1.001]
    assert len(clean_ok) == 8, "most clean test items should fall below the threshold"
    assert len(adv_hit) >= 1, f"no PGD adversarial above the threshold ({s_adv.max():.4g} <= {spec.threshold:.4g})"
    assert (s_adv > spec.threshold).float().mean() > (s_clean > spec.threshold).float().mean()
    return {"root": root, "name": bundle.name, "threshold": spec.threshold, "clean": clean_ok.numpy(),
            "adv": adv_hit[:1].numpy(), "det": det, "clf": clf, "module": module}


def pipeline(action):
    return {"stages": [{"name": STAGE, "kind": "magnet", "action": action, "params": {"runtime": "onnx"}}]}


def test_clean_accepted_and_adversarial_rejected(served):
    # server.explain: the rejection names score and threshold (off by default; tests/proxy/test_verdicts.py)
    proxy = LoopbackProxy(served["root"], pipeline("reject"), {"server": {"explain": True}})
    try:
        # the L1 detector runs inside the backbone's session call (proxy/backends/fuse.py)
        assert proxy.server.runner.fused is not None and proxy.server.runner.fused.stages == (STAGE,)
        res = infer(proxy.url, served["name"], served["clean"])
        np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), np.zeros(8))
        with torch.no_grad():
            want = served["det"].score(torch.from_numpy(served["clean"]), served["clf"]).numpy()
            logits = served["module"](torch.from_numpy(served["clean"])).numpy()
        np.testing.assert_allclose(res.as_numpy(f"robustgate_score_{STAGE}"), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.as_numpy("logits"), logits, rtol=1e-4, atol=1e-4)

        with pytest.raises(InferenceServerException) as err:
            infer(proxy.url, served["name"], served["adv"])
        assert err.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
        m = re.search(rf"rejected by robustgate: item 0 stage {STAGE} score (\S+) threshold (\S+)", err.value.message())
        assert m, err.value.message()
        with torch.no_grad():
            adv_score = served["det"].score(torch.from_numpy(served["adv"]), served["clf"]).item()
        assert float(m.group(1)) == pytest.approx(adv_score, rel=1e-4)
        assert float(m.group(2)) == pytest.approx(served["threshold"], rel=1e-5)  # the message prints 6 significant digits (rounding up to 5e-6 relative)
    finally:
        proxy.stop()


def test_flag_mode_returns_prediction_with_verdict(served):
    proxy = LoopbackProxy(served["root"], pipeline("flag"), {"server": {"explain": True}})  # scores: explain only
    try:
        batch = np.concatenate([served["clean"][:1], served["adv"]])
        res = infer(proxy.url, served["name"], batch)
        np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), [0, 1])
        with torch.no_grad():
            logits = served["module"](torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(res.as_numpy("logits"), logits, rtol=1e-4, atol=1e-4)
        scores = res.as_numpy(f"robustgate_score_{STAGE}")
        assert scores[0] <= served["threshold"] < scores[1]
    finally:
        proxy.stop()


def test_onnx_backend_shared_pass_matches_separate_calls(tiny_bundle):
    """One session call gives the logits of ``infer`` and the features a detector would read."""
    from robustgate.proxy.backends.onnx import OnnxBackend

    backend = OnnxBackend(Bundle.load(tiny_bundle), intra_op_threads=1)
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    logits, feats = backend.infer_with_features(x)
    assert np.array_equal(logits, backend.infer(x))
    want = backend.classifier().features(torch.from_numpy(x)).numpy()
    assert feats.shape == want.shape and np.array_equal(feats, want)
    backend.close()


def test_served_magnet_runs_in_onnx_runtime_unless_the_stage_names_a_runtime(served):
    """The bundle records ``runtime: torch`` (what fit trains and the red team attacks); the proxy on
    a CPU device serves an l1/l2 MagNet stage that names no runtime in ONNX Runtime (fusable into
    the backbone's session), a stage's own ``runtime`` wins, the red team's twin stays torch."""
    from robustgate.defenses.assemble import PipelineConfig, build_stages
    from robustgate.defenses.detect.magnet import MagNet

    bundle = Bundle.load(served["root"])
    assert bundle.defense(STAGE).params["runtime"] == "torch"

    def built(params, twin=False):
        cfg = PipelineConfig.model_validate({"stages": [{"name": STAGE, "kind": "magnet", "params": params}]})
        return build_stages(cfg, bundle, twin=twin)[0].defense

    default = built({})
    assert default.runtime == "onnx" and default.onnx_score_model() is not None
    assert built({"runtime": "torch"}).runtime == "torch"
    assert built({}, twin=True).runtime == "torch"
    with torch.no_grad():
        x = torch.from_numpy(served["clean"])
        torch.testing.assert_close(default.score(x), served["det"].score(x), rtol=1e-4, atol=1e-6)
    assert MagNet.served_runtime({"criterion": "jsd"}) is None  # needs the backbone on AE(x): not fused
