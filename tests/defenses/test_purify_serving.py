"""Purifiers and ensembles served by the real proxy (grpc.aio on loopback, ONNX Runtime backend)
and queried with tritonclient.grpc (issue 6, "Purification and ensembling").

Every served answer is compared with values computed here, offline, independently of the proxy:
the tiny trained bundle's ONNX backbone run directly in ONNX Runtime on the purifier's own output
(``build(kind, **params).purify(x, generator)``), on hand-built TTE copies, or on hand-drawn
smoothing noise. The proxy's randomness is reproduced exactly: with ``pipeline.seed`` set, each
batch gets ``torch.Generator().manual_seed(seed)`` (defenses/assemble.py ``PipelineRunner.generator``)
and a request sent alone is a batch of its own. Each proxy's backend is wrapped to record what it
is asked to classify, so the purified input itself (shape, dtype, range, values) and the number
of backend calls are checked too.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchattacks
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scipy.stats import binomtest, norm
from tritonclient.utils import InferenceServerException

from robustgate.defenses.base import build
from robustgate.models.bundle import Bundle
from robustgate.models.twin import load_backbone
from robustgate.proxy.config import load_config
from robustgate.proxy.serve import build_server

from loopback import LoopbackProxy

SEED = 11  # pipeline.seed of every proxy here
N_ITEMS = 4
PURIFIERS = {  # kind -> params (the settings)
    "jpeg": {"quality": 60},
    "noise": {"sigma": 0.1},
    "bitdepth": {"bits": 3},
    "median": {"kernel_size": 3},
}
TTE_PRESET = [("id", 0, 0, False), ("hflip", 0, 0, True), ("dx=1", 0, 1, False), ("dx=-1", 0, -1, False),
              ("dy=1", 1, 0, False), ("dy=-1", -1, 0, False)]  # spec, dy, dx, hflip: the fashion-mnist preset
SMOOTH = {"sigma": 0.25, "n0": 8, "n": 64, "alpha": 0.01}


class Proxy(LoopbackProxy):
    """A loopback proxy whose backend's ``infer`` / ``infer_with_features`` record every array they
    are asked to classify; every batch seeded with ``SEED``."""

    def __init__(self, bundle, pipeline, sections=None):
        self.calls: list[tuple[str, np.ndarray]] = []
        self._lock = threading.Lock()
        super().__init__(bundle, {"seed": SEED, **pipeline}, sections)

    def prepare(self) -> None:
        backend = self.server.runner.backend
        for name in ("infer", "infer_with_features"):
            setattr(backend, name, self._recording(name, getattr(backend, name)))

    def _recording(self, name, method):
        def wrapped(x, timeout=None):
            with self._lock:
                self.calls.append((name, np.array(x, copy=True)))
            return method(x, timeout=timeout)

        return wrapped

    def take_calls(self) -> list[tuple[str, np.ndarray]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


@pytest.fixture(scope="module")
def model_name(tiny_bundle) -> str:
    return Bundle.load(tiny_bundle).name


@pytest.fixture(scope="module")
def serve(tiny_bundle):
    """``serve(key, pipeline) -> Proxy``: one proxy per key for the whole module."""
    started: dict[str, Proxy] = {}

    def get(key: str, pipeline: dict, bundle=None, sections=None) -> Proxy:
        if key not in started:
            started[key] = Proxy(bundle or tiny_bundle, pipeline, sections)
        return started[key]

    yield get
    for p in started.values():
        p.stop()


@pytest.fixture(scope="module")
def backbone(tiny_bundle):
    """The bundle's ONNX backbone run directly: ``[M, 1, 28, 28]`` float32 -> ``[M, 10]`` logits."""
    bundle = Bundle.load(tiny_bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    return lambda x: sess.run([bundle.spec.backbone.logits_output], {"input": np.ascontiguousarray(x, np.float32)})[0]


@pytest.fixture(scope="module")
def clean(fmnist_subset) -> np.ndarray:
    return fmnist_subset("test", N_ITEMS)[0].numpy()  # [4, 1, 28, 28] on the 1/255 grid


@pytest.fixture(scope="module")
def adversarial(fmnist_subset, tiny_bundle) -> np.ndarray:
    """L-inf PGD (eps 0.1, 10 steps of 0.01) on the bundle's torch twin, the first 4 test images."""
    x, y = fmnist_subset("test", N_ITEMS)
    module = load_backbone(tiny_bundle)
    adv = torchattacks.PGD(module, eps=0.1, alpha=0.01, steps=10, random_start=False)(x, y).detach()
    with torch.no_grad():
        assert (module(adv).argmax(1) != y).any(), "PGD fooled the tiny backbone on none of the items"
    return adv.numpy()


def triton_infer(url: str, model: str, x: np.ndarray, datatype: str = "FP32"):
    inp = tc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    with tc.InferenceServerClient(url) as client:
        return client.infer(model, [inp])


def outputs(result) -> dict[str, tuple[str, list[int]]]:
    return {o.name: (o.datatype, list(o.shape)) for o in result.get_response().outputs}


def param(result, name: str) -> str:
    return result.get_response().parameters[name].string_param


def assert_healthy(url: str, model: str) -> None:
    with tc.InferenceServerClient(url) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    with grpc.insecure_channel(url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def one_infer_call(proxy: Proxy) -> np.ndarray:
    """The single ``infer`` call the backend received since the last check (no other call)."""
    calls = proxy.take_calls()
    assert [name for name, _ in calls] == ["infer"], f"expected one backend infer call, got {[n for n, _ in calls]}"
    return calls[0][1]


def plain_logits(serve, model: str, x: np.ndarray) -> np.ndarray:
    """The undefended proxy's answer (no stages)."""
    return triton_infer(serve("plain", {"stages": []}).url, model, x).as_numpy("logits")


# ---- 1 + 6. each purifier through the proxy ------------------------------------------------------

@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("kind", sorted(PURIFIERS))
def test_purifier_answer_is_the_backbone_on_its_offline_output(serve, model_name, backbone, clean, kind, datatype):
    params = PURIFIERS[kind]
    proxy = serve(kind, {"stages": [{"name": kind, "kind": kind, "params": params}]})
    u8 = np.round(clean * 255).astype(np.uint8)
    x = u8.astype(np.float32) / np.float32(255)  # what the proxy decodes from UINT8 (docs/PROTOCOL.md)
    assert np.array_equal(x, clean)  # Fashion-MNIST's floats are on the 1/255 grid: both requests mean the same pixels
    want_x = build(kind, **params).purify(torch.from_numpy(clean), torch.Generator().manual_seed(SEED)).numpy()
    assert np.abs(want_x - clean).max() > 0.05, f"{kind} left the test images unchanged: the test would prove nothing"

    proxy.take_calls()
    res = triton_infer(proxy.url, model_name, u8 if datatype == "UINT8" else clean, datatype)

    # the answer's outputs, as the protocol says
    assert outputs(res) == {"logits": ("FP32", [N_ITEMS, 10]), "robustgate_verdict": ("INT32", [N_ITEMS])}
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), np.zeros(N_ITEMS))
    assert param(res, "robustgate_verdicts") == ",".join(["accepted"] * N_ITEMS)
    assert param(res, "robustgate_reasons") == "," * (N_ITEMS - 1)
    # the backend classified the purified batch once: same shape, float32, in range, the offline values
    seen = one_infer_call(proxy)
    assert seen.shape == clean.shape and seen.dtype == np.float32
    assert seen.min() >= 0.0 and seen.max() <= 1.0
    np.testing.assert_array_equal(seen, want_x)
    logits = res.as_numpy("logits")
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, backbone(want_x), rtol=1e-5, atol=1e-5)
    assert np.abs(logits - backbone(clean)).max() > 1e-3  # differs from the undefended answer: the stage ran
    assert_healthy(proxy.url, model_name)


def test_seeded_noise_repeats_per_request_and_depends_on_the_batch(serve, model_name, backbone, clean):
    """The fixed seed restarts the generator for every batch: the same request gets the same noise;
    a request of the first two items alone gets the first two items' share of that stream."""
    proxy = serve("noise", {"stages": [{"name": "noise", "kind": "noise", "params": PURIFIERS["noise"]}]})
    proxy.take_calls()
    a = triton_infer(proxy.url, model_name, clean).as_numpy("logits")
    b = triton_infer(proxy.url, model_name, clean).as_numpy("logits")
    np.testing.assert_array_equal(a, b)
    proxy.take_calls()
    pair = np.ascontiguousarray(clean[2:])
    got = triton_infer(proxy.url, model_name, pair).as_numpy("logits")
    eps = torch.randn(pair.shape, generator=torch.Generator().manual_seed(SEED)).numpy()  # drawn for this batch
    want_x = np.clip(pair + np.float32(0.1) * eps, 0.0, 1.0)
    np.testing.assert_allclose(one_infer_call(proxy), want_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, backbone(want_x), rtol=1e-5, atol=1e-4)
    assert np.abs(got - a[2:]).max() > 1e-3  # items 2-3 drew other noise in the 4-item batch
    assert_healthy(proxy.url, model_name)


def test_overlapped_front_halves_answer_each_request_with_its_own_purified_items(serve, model_name, backbone, clean):
    """``batching.overlap_front``: the purifiers of one batch run in the front thread while another
    batch classifies; concurrent clients each get the backbone on their own purified items."""
    from concurrent.futures import ThreadPoolExecutor

    stages = [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 30}}, {"name": "median", "kind": "median"}]
    proxy = serve("overlap", {"stages": stages}, sections={"batching": {"overlap_front": True, "max_batch_size": 4}})
    requests = [np.ascontiguousarray(np.roll(clean, k, axis=0)[: 1 + k % N_ITEMS]) for k in range(24)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda x: triton_infer(proxy.url, model_name, x).as_numpy("logits"), requests))
    for x, got in zip(requests, answers):
        want_x = build("median").purify(build("jpeg", quality=30).purify(torch.from_numpy(x))).numpy()
        np.testing.assert_allclose(got, backbone(want_x), rtol=1e-5, atol=1e-5)
    assert any(t.name.startswith("robustgate-front") for t in threading.enumerate())  # the front thread ran them
    assert_healthy(proxy.url, model_name)


# ---- 2. JPEG: near-identity at quality 100, a measurable change at quality 10 --------------------

def test_jpeg_quality_100_is_near_identity_through_the_proxy(serve, model_name, backbone, clean):
    proxy = serve("jpeg100", {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 100}}]})
    undefended = plain_logits(serve, model_name, clean)
    np.testing.assert_allclose(undefended, backbone(clean), rtol=1e-5, atol=1e-5)
    proxy.take_calls()
    got = triton_infer(proxy.url, model_name, clean).as_numpy("logits")
    seen = one_infer_call(proxy)
    assert np.abs(seen - clean).max() <= 3 / 255  # the codec ran: at most a few grey levels moved
    np.testing.assert_allclose(got, undefended, rtol=0, atol=0.05)
    np.testing.assert_array_equal(got.argmax(1), undefended.argmax(1))
    assert_healthy(proxy.url, model_name)


def test_jpeg_quality_10_changes_the_answer_on_a_pgd_input(serve, model_name, backbone, adversarial):
    undefended = plain_logits(serve, model_name, adversarial)
    np.testing.assert_allclose(undefended, backbone(adversarial), rtol=1e-5, atol=1e-5)
    q10 = serve("jpeg10", {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 10}}]})
    q10.take_calls()
    got = triton_infer(q10.url, model_name, adversarial).as_numpy("logits")
    want_x = build("jpeg", quality=10).purify(torch.from_numpy(adversarial)).numpy()
    np.testing.assert_array_equal(one_infer_call(q10), want_x)
    np.testing.assert_allclose(got, backbone(want_x), rtol=1e-5, atol=1e-5)
    change = np.abs(got - undefended).max(1)  # [4] per item
    assert (change > 0.3).all(), f"JPEG q10 moved the PGD items' logits by only {change}"
    q100 = serve("jpeg100", {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 100}}]})
    near = np.abs(triton_infer(q100.url, model_name, adversarial).as_numpy("logits") - undefended).max(1)
    assert change.mean() > 3 * near.mean(), f"q10 change {change} not well above q100's {near}"
    assert_healthy(q10.url, model_name)


# ---- 3. TTE: one backend call of B x T items, the log of the averaged softmax ---------------------

def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[.., i, j] = x[.., clip(i - dy), clip(j - dx)]``: shifted down/right, border replicated."""
    h, w = x.shape[-2:]
    rows, cols = np.clip(np.arange(h) - dy, 0, h - 1), np.clip(np.arange(w) - dx, 0, w - 1)
    return x[..., rows, :][..., cols]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_tte_is_one_backend_call_of_b_times_t_items(serve, model_name, backbone, clean):
    proxy = serve("tte", {"stages": [{"name": "tte", "kind": "tte"}]})
    x = np.ascontiguousarray(clean[:3])  # B = 3
    views = [shifted(x[..., ::-1] if flip else x, dy, dx) for _, dy, dx, flip in TTE_PRESET]  # T x [B, 1, 28, 28]
    copies = np.stack(views, axis=1).reshape(-1, *x.shape[1:])  # [B*T, 1, 28, 28] item-major
    proxy.take_calls()
    res = triton_infer(proxy.url, model_name, x)
    seen = one_infer_call(proxy)  # exactly one call, no features pass
    assert seen.shape == (3 * len(TTE_PRESET), 1, 28, 28)
    np.testing.assert_array_equal(seen, copies)
    probs = np.mean([softmax(backbone(v)) for v in views], axis=0)  # [B, 10], one ORT run per transform
    assert outputs(res) == {"logits": ("FP32", [3, 10]), "robustgate_verdict": ("INT32", [3]),
                            "robustgate_radius": ("FP32", [3])}
    logits = res.as_numpy("logits")
    np.testing.assert_allclose(logits, np.log(probs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(softmax(logits), probs, rtol=1e-5, atol=1e-6)  # the answer's distribution
    assert np.abs(probs - softmax(backbone(x))).max() > 1e-3  # the ensemble differs from the plain answer
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), np.zeros(3))
    assert np.isnan(res.as_numpy("robustgate_radius")).all()  # TTE certifies nothing
    assert_healthy(proxy.url, model_name)


# ---- 4. randomized smoothing, CERTIFY -----------------------------------------------------------

def certify_by_hand(backbone, x: np.ndarray) -> dict[str, np.ndarray]:
    """Cohen et al.'s CERTIFY on ``x`` with the proxy's seeded noise, recomputed here: the noisy
    copies (item-major, ``n0`` selection then ``n`` estimation rows per item), the votes, ``c_A``,
    ``n_A``, the exact Clopper-Pearson lower bound (scipy's binomtest, two-sided at ``1 - 2 alpha``
    = one-sided at ``1 - alpha``) and ``R = sigma * Phi^-1(p_A_lower)``."""
    sigma, n0, n, alpha = SMOOTH["sigma"], SMOOTH["n0"], SMOOTH["n"], SMOOTH["alpha"]
    t = n0 + n
    rep = torch.from_numpy(x).repeat_interleave(t, dim=0)  # [N*T, 1, 28, 28]
    copies = (rep + sigma * torch.randn(rep.shape, generator=torch.Generator().manual_seed(SEED))).numpy()
    votes = backbone(copies).argmax(1).reshape(len(x), t)  # [N, T]
    counts0 = np.stack([np.bincount(v[:n0], minlength=10) for v in votes])  # [N, 10]
    counts = np.stack([np.bincount(v[n0:], minlength=10) for v in votes])
    c_a = counts0.argmax(1)
    n_a = counts[np.arange(len(x)), c_a]
    p_lower = np.array([binomtest(int(k), n).proportion_ci(1 - 2 * alpha, method="exact").low for k in n_a])
    certified = p_lower >= 0.5
    radius = np.where(certified, sigma * norm.ppf(np.maximum(p_lower, 0.5)), np.nan)
    return {"copies": copies, "counts": counts, "c_a": c_a, "n_a": n_a, "certified": certified, "radius": radius}


def smoothing_stage(verdict_mode: str) -> dict:
    return {"stages": [{"name": "smooth", "kind": "smoothing", "params": {**SMOOTH, "mode": "certify"}}],
            "verdict_mode": verdict_mode}


@pytest.fixture(scope="module")
def smoothing_batch(fmnist_subset, backbone):
    """6 consecutive test images whose seeded CERTIFY (as a 6-item batch) has abstentions,
    certified items with a saturated count (n_A = n) and at least one with a non-trivial count
    (0 < n_A < n) that is certified alone too: the first such window of the test set. The tiny
    backbone is trained in the session, and its weights (so the counts) differ in the last bits
    between CPUs: a fixed window had no abstention on one machine."""
    pool = fmnist_subset("test", 240)[0].numpy()
    for start in range(0, len(pool), 6):
        x = np.ascontiguousarray(pool[start:start + 6])
        want = certify_by_hand(backbone, x)
        cert, partial = want["certified"], want["certified"] & (want["n_a"] < SMOOTH["n"])
        if (~cert).any() and (cert & (want["n_a"] == SMOOTH["n"])).any() and partial.any():
            item = int(np.flatnonzero(partial)[0])
            if certify_by_hand(backbone, np.ascontiguousarray(x[item:item + 1]))["certified"].all():
                return x, want
    raise AssertionError("no window of 6 of the first 240 test images has abstentions and both kinds of certified items")


def test_smoothing_radius_is_the_hand_computed_clopper_pearson_bound(serve, model_name, smoothing_batch):
    x, want = smoothing_batch
    proxy = serve("smooth-item", smoothing_stage("item"))
    proxy.take_calls()
    res = triton_infer(proxy.url, model_name, x)
    np.testing.assert_array_equal(one_infer_call(proxy), want["copies"])  # the N*(n0+n) copies, one call
    assert outputs(res) == {"logits": ("FP32", [6, 10]), "robustgate_verdict": ("INT32", [6]),
                            "robustgate_radius": ("FP32", [6])}
    cert = want["certified"]
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), np.where(cert, 0, 2))
    assert param(res, "robustgate_reasons") == ",".join("" if c else "smooth" for c in cert)
    radius = res.as_numpy("robustgate_radius")
    assert np.isnan(radius[~cert]).all()
    np.testing.assert_allclose(radius[cert], want["radius"][cert], rtol=1e-5, atol=1e-6)
    assert len(np.unique(want["radius"][cert])) >= 2  # n_A = n and n_A < n give different radii
    logits = res.as_numpy("logits")
    assert np.isnan(logits[~cert]).all()  # an abstention is a rejection: no prediction returned
    freq = want["counts"][cert] / SMOOTH["n"]  # the vote frequencies over the n estimation samples
    np.testing.assert_allclose(logits[cert], np.log(np.maximum(freq, 1e-12)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[cert].argmax(1), want["c_a"][cert])
    assert_healthy(proxy.url, model_name)


def test_smoothing_abstention_is_permission_denied_in_request_mode(serve, model_name, backbone, smoothing_batch):
    x, want = smoothing_batch
    proxy = serve("smooth-request", smoothing_stage("request"))
    with pytest.raises(InferenceServerException) as err:
        triton_infer(proxy.url, model_name, x)
    assert err.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
    first = int(np.flatnonzero(~want["certified"])[0])
    assert err.value.message() == f"rejected by robustgate: item {first} stage smooth"  # server.explain off
    assert_healthy(proxy.url, model_name)
    # a certified item sent alone (its own batch, so its own draw of the seeded noise) is answered
    item = int(np.flatnonzero(want["certified"] & (want["n_a"] < SMOOTH["n"]))[0])
    alone = np.ascontiguousarray(x[item:item + 1])
    mine = certify_by_hand(backbone, alone)
    assert mine["certified"].all(), mine
    res = triton_infer(proxy.url, model_name, alone)
    np.testing.assert_array_equal(res.as_numpy("robustgate_verdict"), [0])
    np.testing.assert_allclose(res.as_numpy("robustgate_radius"), mine["radius"], rtol=1e-5, atol=1e-6)
    assert res.as_numpy("logits").argmax(1).tolist() == mine["c_a"].tolist()


# ---- 5. model-based stages need their fitted artifacts -------------------------------------------

@pytest.mark.parametrize("kind, params", [("diffusion", {"t_star": 0, "block_out_channels": [8, 16]}),
                                          ("diffusion", {"t_star": 50, "runtime": "onnx"}),
                                          ("reformer", {})])
def test_a_model_based_stage_the_bundle_has_not_fitted_is_refused_at_start(tiny_bundle, kind, params):
    """An unfitted diffusion model or autoencoder would purify with random weights (or fail every
    batch): the server refuses to start, naming the stage and the fit command. (A fitted diffusion
    stage, t* = 0 included, is served in tests/defenses/test_diffusion_bundle.py.)"""
    assert "purifier" not in Bundle.load(tiny_bundle).spec.defenses
    cfg = load_config(None, environ={}, overrides={
        "bundle": str(tiny_bundle), "pipeline": {"stages": [{"name": "purifier", "kind": kind, "params": params}]},
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0}})
    with pytest.raises(ValueError, match=rf"pipeline.stages.0 \(purifier\): '{kind}' runs a fitted model, but the bundle "
                                         rf"has no fitted defense 'purifier'; fit it first: robustgate fit --bundle BUNDLE "
                                         rf"--defense {kind} --name purifier"):
        build_server(cfg)
