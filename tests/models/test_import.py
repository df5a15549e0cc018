"""``robustgate import``: a user's own ONNX model (or one a V2 server serves) -> a bundle.

Tiny RGB models written in plain torch, exported with ``torch.onnx.export`` with a dynamic batch
axis (random seeded weights: importing does not depend on training), imported through the real
command, loaded and verified by ``Bundle.load``, their torch twin checked against ONNX Runtime,
served by a real proxy on loopback and called with tritonclient. Every refusal writes nothing. A
model onnx2torch cannot convert (``nn.Mish`` exports as ONNX ``Mish``, which it does not
implement) imports without a twin and still serves; ``--upstream`` reads a real MLServer.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as tc
from torch import nn
from tritonclient.utils import InferenceServerException

import harness  # tests/proxy/upstream (pytest pythonpath)
import scripted  # tests/proxy/upstream
from loopback import LoopbackProxy  # tests/helpers
from robustgate.attacks.endpoint import GrpcOracle
from robustgate.models.bundle import Bundle, BundleError, sha256_file
from robustgate.models.importer import ImportRefused, import_onnx, import_upstream
from robustgate.models.twin import NoTwin, TorchClassifier, has_twin, load_backbone
from robustgate.protos import open_inference_grpc_pb2 as pb
from robustgate.proxy.cli import main as cli


class Cnn32(nn.Module):
    """3 convs on [N, 3, 32, 32] -> logits [N, 10]."""

    def __init__(self, classes: int = 10, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), act(),  # [N, 8, 16, 16]
            nn.Conv2d(8, 16, 3, stride=2, padding=1), act(),  # [N, 16, 8, 8]
            nn.Conv2d(16, 16, 3, stride=2, padding=1), act(),  # [N, 16, 4, 4]
            nn.Flatten(),  # [N, 256]
        )
        self.head = nn.Linear(256, classes)

    def forward(self, x):
        return self.head(self.body(x))


class Cnn64Features(nn.Module):
    """[N, 3, 64, 64] -> (logits [N, 10], features [N, 32])."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),  # [N, 8, 32, 32]
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),  # [N, 16, 16, 16]
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # [N, 32, 8, 8]
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # [N, 32]
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        f = self.body(x)
        return self.head(f), f


class ChannelsLast(nn.Module):
    """[N, 32, 32, 3] (NHWC, as a Keras model exported by tf2onnx takes it) -> logits [N, 10]."""

    def __init__(self):
        super().__init__()
        self.cnn = Cnn32()

    def forward(self, x):
        return self.cnn(x.permute(0, 3, 1, 2))


class Probabilities(nn.Module):
    """Cnn32 ending in a softmax (as Keras classifiers usually do): [N, 3, 32, 32] -> probabilities [N, 10]."""

    def __init__(self):
        super().__init__()
        self.cnn = Cnn32()

    def forward(self, x):
        return torch.softmax(60 * self.cnn(x), dim=1)  # random weights: small logits, sharpened


class Sharpened(nn.Module):
    """The logits head of :class:`Probabilities` (same weights under ``make``): ``60 * Cnn32(x)``."""

    def __init__(self):
        super().__init__()
        self.cnn = Cnn32()

    def forward(self, x):
        return 60 * self.cnn(x)


class Flat(nn.Module):
    """[N, 3, 8, 3] -> logits [N, 10]: an input whose second and last axes could both be channels."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(72, 10))

    def forward(self, x):
        return self.head(x)


class FeatureMap(nn.Module):
    """[N, 3, 32, 32] -> [N, 4, 32, 32]: not a classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def export(module: nn.Module, path, shape, outputs=("logits",), dynamic=True, legacy=False, dynamic_hw=False,
           half=False, uint8=False):
    """``torch.onnx.export`` with the batch axis dynamic (torch.export-based exporter unless ``legacy``);
    ``half``: the model converted to FP16, input and outputs too (legacy exporter); ``uint8``: the
    model takes UINT8 levels."""
    torch.manual_seed(0)
    module = module.eval()
    x = torch.rand(2 if dynamic else 1, *shape)  # a fixed batch is 1, as a naive export writes it
    if uint8:
        x = (x * 255).to(torch.uint8)
    if half:
        module, x, legacy = module.half(), x.half(), True
    if legacy:
        axes = {0: "batch", **({2: "h", 3: "w"} if dynamic_hw else {})}
        torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=list(outputs),
                          dynamic_axes={"input": axes, **{o: {0: "batch"} for o in outputs}} if dynamic else None,
                          dynamo=False)
    else:
        torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=list(outputs),
                          dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None,
                          dynamo=True, external_data=False)
    return path


def make(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    torch.set_num_threads(1)
    return {
        "cnn32": export(make(Cnn32), d / "cnn32.onnx", (3, 32, 32)),
        "cnn64f": export(make(Cnn64Features), d / "cnn64f.onnx", (3, 64, 64), outputs=("logits", "features"),
                         legacy=True),
        "mish": export(make(Cnn32, act=nn.Mish), d / "mish.onnx", (3, 32, 32)),
        "fixed": export(make(Cnn32), d / "fixed.onnx", (3, 32, 32), dynamic=False),
        "dynhw": export(make(Cnn64Features), d / "dynhw.onnx", (3, 64, 64), outputs=("logits", "features"),
                        legacy=True, dynamic_hw=True),
        "map": export(make(FeatureMap), d / "map.onnx", (3, 32, 32), outputs=("map",)),
        "nhwc": export(make(ChannelsLast), d / "nhwc.onnx", (32, 32, 3), legacy=True),
        "flat": export(make(Flat), d / "flat.onnx", (3, 8, 3), legacy=True),
        "probs": export(make(Probabilities), d / "probs.onnx", (3, 32, 32), outputs=("probs",), legacy=True),
        "sharp": export(make(Sharpened), d / "sharp.onnx", (3, 32, 32), outputs=("probs",), legacy=True),
    }


def ort_run(onnx_file, x: np.ndarray, outputs=("logits",)) -> list[np.ndarray]:
    return ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(list(outputs), {"input": x})


def images(n: int, shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def triton_logits(url: str, model: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with tc.InferenceServerClient(url) as client:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp])
    return result.as_numpy("logits"), result.as_numpy("robustgate_verdict")


def served(bundle: Path, x: np.ndarray, stages: list[dict], output: str = "probs", sections=None) -> np.ndarray:
    """``x`` (FP32, or UINT8 when it is uint8) sent by tritonclient to a proxy serving ``bundle`` with
    ``stages`` (and config ``sections``): the answer's ``output``."""
    b = Bundle.load(bundle)
    proxy = LoopbackProxy(bundle, {"stages": stages}, sections)
    try:
        with tc.InferenceServerClient(proxy.url) as client:
            inp = tc.InferInput(b.input.name, list(x.shape), "UINT8" if x.dtype == np.uint8 else "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(b.name, [inp]).as_numpy(output)
    finally:
        proxy.stop()


# ---- import -> load -> twin -> serve ---------------------------------------------------------
def test_cnn32_imports_with_a_twin_that_matches_onnx_runtime_and_serves(models, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"kind-{i}" for i in range(10)) + "\n")
    out = tmp_path / "b32"
    assert cli(["import", "--onnx", str(models["cnn32"]), "--out", str(out), "--name", "mine",
                "--classes", str(classes)]) == 0
    bundle = Bundle.load(out)  # every checksum verified
    bb = bundle.spec.backbone
    assert bundle.name == "mine" and bundle.classes == [f"kind-{i}" for i in range(10)]
    assert tuple(bundle.input.shape) == (3, 32, 32) and bundle.input.value_range == (0.0, 1.0)
    assert bb.twin == "onnx" and has_twin(bundle) and bb.features_output is None
    assert sha256_file(out / "backbone.onnx") == sha256_file(models["cnn32"]) == bb.onnx.sha256
    prov = bundle.spec.provenance
    assert prov["source"] == {"onnx": str(models["cnn32"].resolve()), "sha256": bb.onnx.sha256}
    assert "import --onnx" in prov["command"] and prov["code_revision"]
    parity = bb.twin_parity
    assert parity["items"] == 64 and "uniform random" in parity["inputs"]  # no --dataset: the documented fallback
    assert parity["max_abs_diff"]["logits"] <= parity["atol"]["logits"] and parity["argmax_agreement"] == 1.0

    twin = load_backbone(out)
    x = images(9, (3, 32, 32))
    want = ort_run(out / "backbone.onnx", x)[0]
    xt = torch.from_numpy(x).requires_grad_(True)
    got = twin(xt)
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-4, rtol=1e-4)
    got[:, 3].sum().backward()  # differentiable: what fit and the red team need
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="no features output"):
        twin.features(xt)

    proxy = LoopbackProxy(out, {"stages": []})
    try:
        logits, verdict = triton_logits(proxy.url, "mine", x)
    finally:
        proxy.stop()
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(verdict, np.zeros(9, dtype=np.int32))


def test_channels_last_model_imports_behind_a_transpose_and_serves_its_clients_nhwc(models, tmp_path):
    """An NHWC graph (read from its [?, 32, 32, 3] input): the bundle says so (input.layout NHWC,
    shape (C, H, W)), backbone.onnx and the twin take [N, 3, 32, 32] behind one Transpose, and the
    proxy's clients keep sending [N, 32, 32, 3], getting the original model's logits; an NCHW
    request is refused, naming the shape the server takes; the red team's oracle follows it."""
    out = tmp_path / "nhwc"
    assert cli(["import", "--onnx", str(models["nhwc"]), "--out", str(out), "--classes", "10"]) == 0
    bundle = Bundle.load(out)
    bb = bundle.spec.backbone
    assert tuple(bundle.input.shape) == (3, 32, 32) and bundle.input.layout == "NHWC" and bb.twin == "onnx"
    prov = bundle.spec.provenance
    assert prov["source"]["sha256"] == sha256_file(models["nhwc"]) != bb.onnx.sha256  # the original's, recorded
    assert any("NHWC" in note for note in prov["import_notes"])
    x = images(5, (3, 32, 32))
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    want = ort_run(models["nhwc"], x_nhwc)[0]  # the user's model, as their clients call it
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", x)[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load_backbone(out)(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-4, atol=1e-4)
    proxy = LoopbackProxy(out, {"stages": []})
    try:
        logits, verdict = triton_logits(proxy.url, "nhwc", x_nhwc)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
        assert (verdict == 0).all()
        with tc.InferenceServerClient(proxy.url) as client:
            assert client.get_model_metadata("nhwc", as_json=True)["inputs"][0]["shape"] == ["-1", "32", "32", "3"]
        with pytest.raises(tc.InferenceServerException, match=r"does not match \[N, 32, 32, 3\] \(channels last\)"):
            triton_logits(proxy.url, "nhwc", x)  # NCHW: not what this model takes
        oracle = GrpcOracle(proxy.url, "nhwc")
        np.testing.assert_allclose(oracle.query_one(torch.from_numpy(x[0])), want[0], rtol=1e-5, atol=1e-6)
    finally:
        proxy.stop()
    # a colour stage runs on the decoded [N, 3, 32, 32] batch
    proxy = LoopbackProxy(out, {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 95}}]})
    try:
        logits, verdict = triton_logits(proxy.url, "nhwc", x_nhwc)
    finally:
        proxy.stop()
    assert logits.shape == (5, 10) and (verdict == 0).all()


def test_layout_flag_and_an_ambiguous_input(models, tmp_path, capsys):
    refused(tmp_path, capsys, ["--onnx", str(models["flat"])], "could both hold channels; say which with --layout")
    out = tmp_path / "flat"
    assert cli(["import", "--onnx", str(models["flat"]), "--out", str(out), "--layout", "NCHW"]) == 0
    assert tuple(Bundle.load(out).input.shape) == (3, 8, 3)
    assert sha256_file(out / "backbone.onnx") == sha256_file(models["flat"])  # NCHW: the file itself
    out = tmp_path / "flat_last"
    assert cli(["import", "--onnx", str(models["flat"]), "--out", str(out), "--layout", "NHWC"]) == 0
    assert tuple(Bundle.load(out).input.shape) == (3, 3, 8)
    out = tmp_path / "nhwc_as_given"  # the flag overrides the reading: 32 channels of 32 x 3, as told
    assert cli(["import", "--onnx", str(models["nhwc"]), "--out", str(out), "--layout", "NCHW"]) == 0
    assert tuple(Bundle.load(out).input.shape) == (32, 32, 3)


def test_a_softmax_head_is_recorded_and_the_output_policies_read_it_as_probabilities(models, tmp_path):
    """Rows in [0, 1] summing to 1 on every check input: backbone.output_kind probabilities (a note
    says so); served under the top_k policy a client gets the model's own probabilities, rounded
    (read as logits they would have been flattened by a second softmax); --output-kind overrides."""
    out = tmp_path / "probs"
    assert cli(["import", "--onnx", str(models["probs"]), "--out", str(out)]) == 0
    bundle = Bundle.load(out)
    assert bundle.spec.backbone.output_kind == "probabilities"
    assert any("holds probabilities" in note for note in bundle.spec.provenance["import_notes"])
    x = images(4, (3, 32, 32))
    p = ort_run(models["probs"], x, outputs=("probs",))[0]
    assert p.max(axis=1).min() > 0.2  # a second softmax would flatten these to ~0.12 over 10 classes
    got = served(out, x, [], sections={"outputs": {"policy": "top_k", "k": 1, "decimals": 3}})
    np.testing.assert_allclose(got.max(axis=1), np.round(p.max(axis=1), 3), atol=1e-6)
    assert (got.argmax(axis=1) == p.argmax(axis=1)).all() and (np.count_nonzero(got, axis=1) == 1).all()
    forced = tmp_path / "as_logits"
    assert cli(["import", "--onnx", str(models["probs"]), "--out", str(forced), "--output-kind", "logits"]) == 0
    assert Bundle.load(forced).spec.backbone.output_kind == "logits"
    assert import_onnx(models["cnn32"], tmp_path / "plain").spec.backbone.output_kind == "logits"  # real logits


MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def normalized(x: np.ndarray) -> np.ndarray:
    """What a numpy client sends: normalized in float64, sent as float32."""
    return ((x.astype(np.float64) - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def test_clients_that_normalize_keep_sending_normalized_values(models, tmp_path):
    """``--mean --std`` (torchvision's ImageNet statistics): a model that takes ``(pixels - mean) / std``
    keeps its clients as they are. backbone.onnx and the twin take pixels (the normalization in
    front); the proxy turns each FP32 request back into pixels for the defenses (a boundary pixel's
    rounding clipped, values that are no pixels refused), answers what the user's model answers on
    the client's values, takes UINT8 as pixels, and the red team's oracle sends normalized values."""
    from robustgate.defenses.base import build
    from robustgate.models.client_values import ClientValues

    out = tmp_path / "norm"
    assert cli(["import", "--onnx", str(models["cnn32"]), "--out", str(out), "--name", "norm",
                "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]) == 0
    bundle = Bundle.load(out)
    spec = bundle.input
    assert spec.normalized and spec.mean == pytest.approx(tuple(MEAN)) and spec.std == pytest.approx(tuple(STD))
    source_sha = bundle.spec.provenance["source"]["sha256"]
    assert source_sha == sha256_file(models["cnn32"]) != bundle.spec.backbone.onnx.sha256
    assert any("(pixels - mean) / std" in note for note in bundle.spec.provenance["import_notes"])
    x = images(5, (3, 32, 32))
    x[0, :, :4] = 0.0  # boundary pixels: normalized and turned back in float32, some land an ulp outside [0, 1]
    x[0, :, 4:8] = 1.0
    xn = normalized(x)
    back = ClientValues(tuple(MEAN), tuple(STD)).pixels(xn)
    assert back.min() < 0.0 and back.min() > -1e-6  # what the proxy clips (the test's premise)
    want = ort_run(models["cnn32"], xn)[0]  # the user's model on what its clients send
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", x)[0], want, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(load_backbone(bundle)(torch.from_numpy(x)).numpy(), want, atol=1e-4)

    jpeg = build("jpeg")
    proxy = LoopbackProxy(out, {"stages": [{"name": "jpeg", "kind": "jpeg"}]})
    try:
        got, verdict = triton_logits(proxy.url, "norm", xn)
        purified = jpeg.purify(torch.from_numpy(x)).numpy()  # the defense sees pixels
        np.testing.assert_allclose(got, ort_run(out / "backbone.onnx", purified)[0], atol=1e-4)
        np.testing.assert_array_equal(verdict, np.zeros(5, dtype=np.int32))
        with tc.InferenceServerClient(proxy.url) as client:
            u = np.round(x * 255).astype(np.uint8)
            inp = tc.InferInput("input", list(u.shape), "UINT8")
            inp.set_data_from_numpy(u)
            got_u8 = client.infer("norm", [inp]).as_numpy("logits")
            want_u8 = ort_run(out / "backbone.onnx", jpeg.purify(torch.from_numpy(u / np.float32(255))).numpy())[0]
            np.testing.assert_allclose(got_u8, want_u8, atol=1e-4)
            bad = xn.copy()
            bad[1] += 10.0  # pixels of about 3.3: not what the model's clients send
            inp = tc.InferInput("input", list(bad.shape), "FP32")
            inp.set_data_from_numpy(bad)
            with pytest.raises(InferenceServerException, match=r"the normalized values are pixels in .*mean"):
                client.infer("norm", [inp])
        oracle = GrpcOracle(proxy.url, "norm", client_values=ClientValues.of(spec))
        reply = oracle.ask(torch.from_numpy(x[2]))
        np.testing.assert_allclose(reply.logits, got[2], atol=1e-5)
    finally:
        proxy.stop()


def test_bgr_clients_and_model_keep_their_order_and_the_defenses_see_rgb(models, tmp_path):
    """``--channel-order BGR`` (with Caffe-style per-channel statistics, in BGR order): the clients keep
    sending BGR, normalized or as UINT8, and get what the user's model answers on what they sent;
    backbone.onnx, the twin and the defenses take RGB (the proxy reverses each request; a JPEG stage
    is applied to the RGB picture); the red team's oracle sends BGR."""
    from robustgate.defenses.base import build
    from robustgate.models.client_values import ClientValues

    mean, std = np.array([0.406, 0.456, 0.485]), np.array([0.225, 0.224, 0.229])  # B, G, R
    out = tmp_path / "bgr"
    assert cli(["import", "--onnx", str(models["cnn32"]), "--out", str(out), "--name", "bgr", "--channel-order",
                "BGR", "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std))]) == 0
    bundle = Bundle.load(out)
    spec = bundle.input
    assert spec.channel_order == "BGR" and spec.mean == pytest.approx(tuple(mean))
    rgb = images(4, (3, 32, 32))
    rgb[:, 0] *= 0.3  # the channels differ: reversed ones would not give the same answer
    bgr = rgb[:, ::-1]
    sent = ((bgr - mean[:, None, None]) / std[:, None, None]).astype(np.float32)  # what the clients send
    want = ort_run(models["cnn32"], sent)[0]  # the user's model on it
    assert not np.allclose(want, ort_run(models["cnn32"], ((rgb - mean[:, None, None]) / std[:, None, None])
                                         .astype(np.float32))[0], atol=1e-3)
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", rgb)[0], want, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(load_backbone(bundle)(torch.from_numpy(rgb)).numpy(), want, atol=1e-4)

    jpeg = build("jpeg", subsampling="4:2:0")  # chroma subsampled: JPEG must see R, G, B where they are
    proxy = LoopbackProxy(out, {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"subsampling": "4:2:0"}}]})
    try:
        got, _ = triton_logits(proxy.url, "bgr", sent)
        np.testing.assert_allclose(got, ort_run(out / "backbone.onnx", jpeg.purify(torch.from_numpy(rgb)).numpy())[0],
                                   atol=1e-4)
        u = np.round(rgb * 255).astype(np.uint8)
        with tc.InferenceServerClient(proxy.url) as client:
            inp = tc.InferInput("input", list(u.shape), "UINT8")
            inp.set_data_from_numpy(np.ascontiguousarray(u[:, ::-1]))  # BGR levels
            got_u8 = client.infer("bgr", [inp]).as_numpy("logits")
        np.testing.assert_allclose(
            got_u8, ort_run(out / "backbone.onnx", jpeg.purify(torch.from_numpy(u / np.float32(255))).numpy())[0],
            atol=1e-4)
        oracle = GrpcOracle(proxy.url, "bgr", client_values=ClientValues.of(spec))
        np.testing.assert_allclose(oracle.ask(torch.from_numpy(rgb[1])).logits, got[1], atol=1e-5)
    finally:
        proxy.stop()


def test_normalization_flags_are_checked(models, tmp_path, capsys):
    for argv, message in ((["--mean", "0.5"], "--mean and --std go together"),
                          (["--mean", "0.5,0.5", "--std", "0.2"], "--mean has 2 values for 3 channels"),
                          (["--mean", "0.5", "--std", "0.2,0,0.2"], "every value must be positive")):
        out = tmp_path / "bad"
        assert cli(["import", "--onnx", str(models["cnn32"]), "--out", str(out), *argv]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_a_softmax_head_runs_on_log_probabilities_everywhere_inside(models, tmp_path):
    """One conversion where the model's output enters (models/output_kind.py): the ONNX Runtime
    backend, the fused pass's graph and the torch twin of a softmax-head model give ``log p``, the
    log-softmax of the same network's logits head, so an ensemble averages the model's own
    probabilities, MagNet's jsd compares them and a white-box loss is the true cross-entropy, with the
    gradients of the logits-head network; the answer turns them back into the model's probabilities.
    The bundle's file stays the user's model."""
    import torch.nn.functional as F

    from robustgate.proxy.backends.onnx import OnnxBackend

    probs, sharp = tmp_path / "probs", tmp_path / "sharp"
    for name, out, kind in (("probs", probs, "probabilities"), ("sharp", sharp, "logits")):
        assert cli(["import", "--onnx", str(models[name]), "--out", str(out), "--name", name,
                    "--output-kind", kind]) == 0
    assert sha256_file(probs / "backbone.onnx") == sha256_file(models["probs"])
    x = images(6, (3, 32, 32))
    z = torch.from_numpy(OnnxBackend(Bundle.load(sharp)).infer(x))  # the logits head
    log_p = OnnxBackend(Bundle.load(probs)).infer(x)
    np.testing.assert_allclose(log_p, F.log_softmax(z, 1).numpy(), atol=1e-4)
    assert np.exp(log_p).max(axis=1).min() > 0.2  # sharp: read as logits they would be flattened

    fused = OnnxBackend(Bundle.load(probs)).fused_pass({})  # the graph the shared pass runs
    np.testing.assert_allclose(fused(x)[0], log_p, atol=1e-6)

    twins = {name: load_backbone(b) for name, b in (("probs", probs), ("sharp", sharp))}
    y = torch.arange(6) % 10
    grads = {}
    for name, twin in twins.items():
        xt = torch.from_numpy(x).requires_grad_(True)
        out = twin(xt)
        if name == "probs":
            np.testing.assert_allclose(out.detach().numpy(), log_p, atol=1e-4)
        F.cross_entropy(out, y).backward()  # the red team's loss
        grads[name] = xt.grad
    torch.testing.assert_close(grads["probs"], grads["sharp"], atol=1e-6, rtol=1e-3)

    # served: under the default policy the client gets the model's own probabilities; through an
    # ensemble, the average of its probabilities (the logits-head network's averaged softmax)
    np.testing.assert_allclose(served(probs, x, []), np.exp(log_p), rtol=1e-5, atol=1e-7)
    tte = [{"name": "tte", "kind": "tte"}]
    averaged = served(probs, x, tte)
    sharp_averaged = torch.from_numpy(served(sharp, x, tte).copy())
    np.testing.assert_allclose(averaged, F.softmax(sharp_averaged, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(averaged.sum(axis=1), 1.0, atol=1e-5)
    assert averaged.max(axis=1).min() > 0.2


def test_a_model_that_computes_in_fp16_imports_with_fp32_edges(tmp_path, capsys):
    """A model converted to FP16 (its input and logits FP16, as GPU deployments export it): backbone.onnx
    casts at its edges, so the proxy, the defenses and the red team speak FP32 to it; it answers what
    the FP16 model answers, to FP16's precision, and its twin is the graph in FP32 (FP16 gradients
    underflow)."""
    src = export(make(Cnn32), tmp_path / "half.onnx", (3, 32, 32), half=True)
    out = tmp_path / "b"
    assert cli(["import", "--onnx", str(src), "--out", str(out), "--name", "half"]) == 0
    assert "computes in FP16" in capsys.readouterr().out
    bundle = Bundle.load(out)
    assert bundle.spec.backbone.recipe["precision"] == "fp16" and bundle.spec.backbone.twin == "onnx"
    x = images(6, (3, 32, 32))
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    want = sess.run(["logits"], {"input": x.astype(np.float16)})[0].astype(np.float32)
    fp16 = 1e-2 * max(1.0, float(np.abs(want).max()))  # FP16's precision (ONNX Runtime's CPU may run it in FP32)
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", x)[0], want, atol=fp16)
    xt = torch.from_numpy(x).requires_grad_(True)
    twin = load_backbone(bundle)
    assert {p.dtype for p in twin.parameters()} == {torch.float32}
    got = twin(xt)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.detach().numpy(), want, atol=fp16)
    got[:, 2].sum().backward()
    assert xt.grad is not None and xt.grad.dtype == torch.float32 and float(xt.grad.abs().sum()) > 0
    np.testing.assert_allclose(served(out, x, [], "logits"), ort_run(out / "backbone.onnx", x)[0], rtol=1e-6, atol=1e-7)


class Levels(nn.Module):
    """[N, 32, 32, 3] UINT8 levels (what a TensorFlow model exported with its preprocessing, or a Triton
    model that camera pipelines feed, takes) -> logits: moved to NCHW, cast and scaled inside. Its
    ``cnn`` has :class:`Cnn32`'s weights under ``make``."""

    def __init__(self):
        super().__init__()
        self.cnn = Cnn32()

    def forward(self, x):
        return self.cnn(x.permute(0, 3, 1, 2).float() / 255)


def test_a_model_that_takes_uint8_levels_gets_the_rounding_in_front_and_a_straight_through_twin(tmp_path, capsys):
    """A UINT8 model: backbone.onnx takes FP32 pixels and rounds them onto the levels in front (so it
    answers what the model answers on the levels, and on pixels between them what it answers on the
    nearest); its clients keep sending UINT8 (or send FP32 pixels); the twin passes the gradient
    straight through the rounding: exactly the float model's gradient, not the rounding's zero."""
    src = export(make(Levels), tmp_path / "levels.onnx", (32, 32, 3), uint8=True)
    out = tmp_path / "b"
    assert cli(["import", "--onnx", str(src), "--out", str(out), "--name", "levels"]) == 0
    assert "takes UINT8 levels" in capsys.readouterr().out
    bundle = Bundle.load(out)
    bb = bundle.spec.backbone
    assert (bundle.input.layout, bb.recipe["input_datatype"], bb.twin) == ("NHWC", "uint8", "onnx")
    assert bb.twin_parity["inputs"].endswith("on the UINT8 levels")
    rng = np.random.default_rng(0)
    sent = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)  # what the model's clients send
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["logits"], {"input": sent})[0]
    pixels = np.ascontiguousarray((sent / np.float32(255.0)).transpose(0, 3, 1, 2))  # NCHW
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", pixels)[0], want, rtol=1e-6, atol=1e-6)
    between = np.clip(pixels + rng.uniform(-0.49, 0.49, pixels.shape).astype(np.float32) / 255, 0, 1)
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", between)[0], want, rtol=1e-6, atol=1e-6)

    xt = torch.from_numpy(pixels).requires_grad_(True)
    got = load_backbone(bundle)(xt)
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-4)
    got[:, 3].sum().backward()
    xf = torch.from_numpy(pixels).requires_grad_(True)
    make(Cnn32).eval()(xf)[:, 3].sum().backward()  # the same weights on floats
    np.testing.assert_allclose(xt.grad.numpy(), xf.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert float(xt.grad.abs().sum()) > 0
    from robustgate.proxy.backends.torch import TorchBackend

    torch_backend = TorchBackend(bundle)  # the twin served: the pixels rounded onto the levels first
    np.testing.assert_array_equal(torch_backend.infer(between), torch_backend.infer(pixels))
    np.testing.assert_allclose(torch_backend.infer(between), want, atol=1e-4)

    for arr in (sent, np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))):  # UINT8 and FP32
        np.testing.assert_allclose(served(out, arr, [], "logits"), want, rtol=1e-5, atol=1e-6)

    # pixels in [0, 255] (--value-range 0,255): the levels are the pixels themselves
    wide = import_onnx(src, tmp_path / "wide", value_range=(0.0, 255.0))
    assert wide.spec.backbone.twin == "onnx"
    np.testing.assert_allclose(ort_run(tmp_path / "wide" / "backbone.onnx", pixels * 255)[0], want, rtol=1e-6,
                               atol=1e-6)


def test_a_uint8_model_that_computes_on_its_levels_gets_no_twin(tmp_path, capsys):
    """A graph that reads its UINT8 input with integer arithmetic (here a cast to INT32) cannot have
    its rounding passed straight through: it imports without a twin (gradient-free attacks only),
    says why, and serves; --mean/--std are refused for a UINT8 input."""
    import onnx
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["i32"], to=TensorProto.INT32),
         helper.make_node("Cast", ["i32"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["f"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "ints", [helper.make_tensor_value_info("input", TensorProto.UINT8, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.reshape(-1).tolist())])
    src = tmp_path / "ints.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    refused(tmp_path, capsys, ["--onnx", str(src), "--mean", "0.5", "--std", "0.25"], "takes UINT8 levels")
    assert cli(["import", "--onnx", str(src), "--out", str(tmp_path / "b"), "--name", "ints"]) == 0
    assert "reads its UINT8 input with Cast" in capsys.readouterr().out
    bundle = Bundle.load(tmp_path / "b")
    assert not has_twin(bundle)
    with pytest.raises(NoTwin, match="rounding cannot be passed straight through"):
        load_backbone(bundle)
    sent = np.random.default_rng(1).integers(0, 256, (3, 1, 4, 4)).astype(np.uint8)
    got = served(tmp_path / "b", sent, [], "logits")
    np.testing.assert_allclose(got, sent.reshape(3, -1).astype(np.float32) @ w, rtol=1e-5)


class KerasLike(nn.Module):
    """What a Keras model converted for the GPU often is: [N, 32, 32, 3] normalized FP16 in, softmax
    FP16 out."""

    def __init__(self):
        super().__init__()
        self.cnn = Cnn32()

    def forward(self, x):
        return torch.softmax(60 * self.cnn(x.permute(0, 3, 1, 2)), dim=1)


def test_every_edge_at_once_channels_last_normalized_fp16_softmax(tmp_path, capsys):
    """NHWC, clients that normalize, FP16 and a softmax head in one model: the edits compose (FP16
    casts innermost, then the Transpose, then the normalization; the log of the probabilities at
    load), the client's NHWC normalized request gets the model's own probabilities, and the twin
    (pixels, NCHW, FP32) gives their logarithms."""
    src = export(make(KerasLike), tmp_path / "keras.onnx", (32, 32, 3), outputs=("probs",), half=True)
    out = tmp_path / "b"
    assert cli(["import", "--onnx", str(src), "--out", str(out), "--name", "keras", "--mean", "0.5",
                "--std", "0.25"]) == 0
    capsys.readouterr()
    bundle = Bundle.load(out)
    spec, bb = bundle.input, bundle.spec.backbone
    assert (spec.layout, tuple(spec.shape), spec.normalized, bb.output_kind, bb.recipe["precision"]) == (
        "NHWC", (3, 32, 32), True, "probabilities", "fp16")
    pixels = images(4, (3, 32, 32))  # NCHW pixels
    sent = ((pixels - 0.5) / 0.25).astype(np.float32).transpose(0, 2, 3, 1).copy()  # what the clients send
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    want = sess.run(["probs"], {"input": sent.astype(np.float16)})[0].astype(np.float32)
    got = served(out, sent, [])
    np.testing.assert_allclose(got, want, atol=1e-2)
    assert (got.argmax(1) == want.argmax(1)).all()
    with torch.no_grad():
        log_p = load_backbone(bundle)(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(np.exp(log_p), want, atol=1e-2)


def test_features_model_checked_on_real_data_and_served_with_a_defense(models, tmp_path):
    """Fashion-MNIST (the data set on this machine) as the parity inputs, conformed by the data
    layer to 3x64x64; its class names are taken since the model has 10 logits."""
    out = tmp_path / "b64"
    bundle = import_onnx(models["cnn64f"], out, dataset="fashion-mnist", parity_items=32)
    bb = bundle.spec.backbone
    assert bb.features_output == "features" and bb.twin == "onnx"
    assert "fashion-mnist's test split, conformed to [3, 64, 64]" in bb.twin_parity["inputs"]
    assert bb.twin_parity["items"] == 32 and bundle.classes[0] == "T-shirt/top"
    assert bb.recipe["dataset"] == "fashion-mnist" and bb.recipe["transform"]["channels"] == "1->3"

    twin = load_backbone(bundle)
    clf = TorchClassifier(twin)
    x = images(5, (3, 64, 64))
    logits, feats = ort_run(out / "backbone.onnx", x, ("logits", "features"))
    with torch.no_grad():
        np.testing.assert_allclose(clf.logits(torch.from_numpy(x)).numpy(), logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(clf.features(torch.from_numpy(x)).numpy(), feats, atol=1e-4, rtol=1e-4)

    proxy = LoopbackProxy(out, {"stages": [{"name": "median", "kind": "median"}]})
    try:
        got, verdict = triton_logits(proxy.url, bundle.name, x)
    finally:
        proxy.stop()
    assert got.shape == (5, 10) and np.isfinite(got).all()
    np.testing.assert_array_equal(verdict, np.zeros(5, dtype=np.int32))


def test_dynamic_hw_imports_with_input_shape(models, tmp_path):
    bundle = import_onnx(models["dynhw"], tmp_path / "b", input_shape=(3, 48, 48), value_range=(-1.0, 1.0))
    assert tuple(bundle.input.shape) == (3, 48, 48) and bundle.input.value_range == (-1.0, 1.0)
    assert "[-1.0, 1.0]" in bundle.spec.backbone.twin_parity["inputs"]
    assert bundle.spec.backbone.twin == "onnx"


# ---- a model the converter cannot handle ---------------------------------------------------
def test_unconvertible_model_imports_without_a_twin_and_serves(models, tmp_path):
    out = tmp_path / "mish"
    bundle = import_onnx(models["mish"], out)
    bb = bundle.spec.backbone
    assert bb.twin == "none" and not has_twin(bundle) and "Mish" in bb.twin_note and bb.twin_parity is None
    assert any("no torch twin" in n for n in bundle.spec.provenance["import_notes"])
    with pytest.raises(NoTwin, match="Mish.*gradient"):
        load_backbone(out)
    x = images(4, (3, 32, 32))
    proxy = LoopbackProxy(out, {"stages": [{"name": "median", "kind": "median"}, {"name": "bits", "kind": "bitdepth"},
                                         {"name": "jpeg", "kind": "jpeg", "params": {"quality": 75}}]})
    try:
        got, verdict = triton_logits(proxy.url, bundle.name, x)
    finally:
        proxy.stop()
    assert got.shape == (4, 10) and np.isfinite(got).all()
    np.testing.assert_array_equal(verdict, np.zeros(4, dtype=np.int32))
    plain = LoopbackProxy(out, {"stages": []})
    try:
        np.testing.assert_allclose(triton_logits(plain.url, bundle.name, x)[0], ort_run(out / "backbone.onnx", x)[0],
                                   rtol=1e-5, atol=1e-6)
    finally:
        plain.stop()


# ---- refusals: one clear error, nothing written --------------------------------------------
def refused(tmp_path, capsys, argv: list[str], message: str) -> None:
    out = tmp_path / "out"
    assert cli(["import", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustgate import: ") and message in err, err
    assert err.count("\n") == 1, err  # one message
    assert not out.exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())


def test_refuses_a_file_that_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot a model at all")
    refused(tmp_path, capsys, ["--onnx", str(bad)], "not a valid ONNX model")


def test_weights_in_external_data_files_are_brought_into_the_bundle(tmp_path, capsys):
    """What ``torch.onnx.export(..., dynamo=True)`` writes by default (docs/BYO.md's export command):
    the graph and ``MODEL.onnx.data`` beside it. The import puts the weights back into one
    backbone.onnx (the bundle's one checksummed file), records both source files' sha256, and the
    model serves and has its twin."""
    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    net = Cnn32().eval()
    torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(src / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True)
    assert (src / "model.onnx.data").is_file()  # the exporter's default: external data
    out = tmp_path / "b"
    assert cli(["import", "--onnx", str(src / "model.onnx"), "--out", str(out), "--name", "ext"]) == 0
    assert "external data (model.onnx.data)" in capsys.readouterr().out
    bundle = Bundle.load(out)
    assert sorted(p.name for p in out.iterdir()) == ["backbone.onnx", "bundle.yaml"]
    source = bundle.spec.provenance["source"]
    assert source["sha256"] == sha256_file(src / "model.onnx")
    assert source["external_data"] == {"model.onnx.data": sha256_file(src / "model.onnx.data")}
    x = images(4, (3, 32, 32))
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(load_backbone(bundle)(torch.from_numpy(x)).numpy(), want, atol=1e-4)
    (src / "model.onnx.data").unlink()  # the bundle does not need the source any more
    np.testing.assert_allclose(served(out, x, [], "logits"), want, atol=1e-4)


def test_refuses_external_data_that_is_missing_outside_or_too_large(models, tmp_path, capsys, monkeypatch):
    import onnx

    from robustgate.models import importer

    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    onnx.save(onnx.load(str(models["cnn32"])), str(split), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    monkeypatch.setattr(importer, "ONE_FILE_LIMIT", 1000)
    refused(tmp_path, capsys, ["--onnx", str(split)], "more than one ONNX file can (2 GiB")
    monkeypatch.undo()
    (split.parent / "weights.bin").rename(tmp_path / "weights.bin")
    refused(tmp_path, capsys, ["--onnx", str(split)], "keeps its data in 'weights.bin', which is not there")
    outside = tmp_path / "outside" / "model.onnx"
    outside.parent.mkdir()
    model = onnx.load(str(split), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"  # exists, but not beside the model
    onnx.save(model, str(outside))
    refused(tmp_path, capsys, ["--onnx", str(outside)], "outside the model's folder")


def test_refuses_dynamic_hw_without_input_shape(models, tmp_path, capsys):
    refused(tmp_path, capsys, ["--onnx", str(models["dynhw"])], "dynamic H/W ([?, 3, ?, ?]); give the per-item "
            "shape the model is served at with --input-shape C,H,W")


def test_refuses_input_shape_that_contradicts_the_graph(models, tmp_path, capsys):
    refused(tmp_path, capsys, ["--onnx", str(models["cnn32"]), "--input-shape", "3,64,64"], "contradicts the graph's H = 32")


class BakedBatch(nn.Module):
    """[1, 3, 32, 32] -> [1, 10], summing over the batch axis (the identity at a batch of 1): a graph
    that only works with the batch it was exported with."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).sum(0, keepdim=True).reshape(1, -1))


def test_a_fixed_batch_of_one_is_made_dynamic_when_items_stay_apart(models, tmp_path, capsys):
    """Exported without a dynamic batch (both exporters; the torch.export-based one bakes ``[1, 256]``
    into the flatten's Reshape, under allowzero): the import makes the batch axis dynamic, the
    reshape's batch -1 (0 without allowzero), and checks every item, alone and in a batch, against the
    model as exported; such a model then serves batches of any size."""
    legacy = export(make(Cnn32), tmp_path / "legacy_fixed.onnx", (3, 32, 32), dynamic=False, legacy=True)
    for i, src in enumerate((models["fixed"], legacy)):
        out = tmp_path / f"b{i}"
        assert cli(["import", "--onnx", str(src), "--out", str(out), "--name", "fixed"]) == 0
        assert "fixed batch of 1: backbone.onnx has its batch axis made dynamic" in capsys.readouterr().out
        assert Bundle.load(out).spec.backbone.twin == "onnx"  # onnx2torch reads the freed reshape too
        x = images(5, (3, 32, 32))
        want = np.concatenate([ort_run(src, x[j:j + 1])[0] for j in range(5)])  # the model, one item at a time
        np.testing.assert_allclose(ort_run(out / "backbone.onnx", x)[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(served(out, x, [], "logits"), want, rtol=1e-5, atol=1e-6)


class ConvHead(nn.Module):
    """An older-style classifier: a 1x1 convolution to the classes and global pooling, no flatten:
    [N, 3, 32, 32] -> [N, 10, 1, 1] (SqueezeNet's shape before torchvision flattened it)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 10, 1),
                                  nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.body(x)


def test_logits_of_shape_batch_classes_1_1_are_flattened(tmp_path, capsys):
    """The ONNX model zoo's older classifiers answer [N, K, 1, 1] (and often have a fixed batch of 1):
    backbone.onnx flattens the output under its name, the twin and the proxy give [N, K]."""
    src = export(make(ConvHead), tmp_path / "convhead.onnx", (3, 32, 32), dynamic=False, legacy=True)
    out = tmp_path / "b"
    assert cli(["import", "--onnx", str(src), "--out", str(out), "--name", "convhead"]) == 0
    assert "flattens it to [batch, classes]" in capsys.readouterr().out
    x = images(3, (3, 32, 32))
    want = np.concatenate([ort_run(src, x[j:j + 1])[0] for j in range(3)]).reshape(3, 10)
    np.testing.assert_allclose(served(out, x, [], "logits"), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(load_backbone(out)(torch.from_numpy(x)).numpy(), want, atol=1e-5)


def test_refuses_a_fixed_batch_that_the_graph_baked_in(tmp_path, capsys):
    src = export(make(BakedBatch), tmp_path / "baked.onnx", (3, 32, 32), dynamic=False, legacy=True)
    refused(tmp_path, capsys, ["--onnx", str(src)], "exported with a fixed batch of 1, and making it dynamic does not")


def test_refuses_an_output_that_is_not_batch_by_classes(models, tmp_path, capsys):
    refused(tmp_path, capsys, ["--onnx", str(models["map"])], "the logits must be [batch, classes]")


def test_refuses_a_class_file_of_the_wrong_length(models, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nbird\n")
    refused(tmp_path, capsys, ["--onnx", str(models["cnn32"]), "--classes", str(classes)],
            "3 class names for a logits output of 10 classes")
    refused(tmp_path, capsys, ["--onnx", str(models["cnn32"]), "--classes", "7"], "--classes 7: the logits output has 10")


def test_refuses_output_names_that_are_not_outputs(models, tmp_path, capsys):
    refused(tmp_path, capsys, ["--onnx", str(models["cnn64f"]), "--logits-output", "probs"],
            "--logits-output 'probs' is not an FP32 output of the graph (outputs: ['logits', 'features'])")
    refused(tmp_path, capsys, ["--onnx", str(models["cnn32"]), "--features-output", "penultimate"],
            "--features-output 'penultimate' is not an FP32 output")


def test_refuses_an_existing_out_dir_unless_forced(models, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ImportRefused, match="already exists"):
        import_onnx(models["cnn32"], out)
    assert (out / "keep").exists()
    bundle = import_onnx(models["cnn32"], out, force=True)
    assert not (out / "keep").exists() and bundle.spec.backbone.twin == "onnx"


def test_old_bundles_keep_their_meaning(tmp_path):
    """A bundle.yaml without ``twin``: weights -> an arch twin, none -> no twin; no onnx and no
    upstream is refused at load."""
    import yaml

    from robustgate.models.bundle import BackboneSpec, UpstreamSource

    default = Path(__file__).resolve().parents[2] / "bundles" / "default"
    bundle = Bundle.load(default, verify=False)
    assert bundle.spec.backbone.twin is None and bundle.spec.backbone.twin_kind() == "arch" and has_twin(bundle)
    raw = yaml.safe_load((default / "bundle.yaml").read_text())
    assert bundle.spec.model_dump(mode="json", exclude_none=True) == raw  # re-saved unchanged
    art = {"path": "backbone.onnx", "sha256": "0" * 64}
    assert BackboneSpec(onnx=art, arch="cnn", weights={"path": "w.safetensors", "sha256": "1" * 64}).twin_kind() == "arch"
    assert BackboneSpec(onnx=art, arch="cnn").twin_kind() == "none"
    with pytest.raises(ValueError, match="backbone.onnx: required"):
        BackboneSpec(arch="cnn")
    with pytest.raises(ValueError, match="twin is 'onnx' but"):
        BackboneSpec(upstream=UpstreamSource(url="h:1", model_name="m"), arch="x", twin="onnx")
    from robustgate.models.bundle import InputSpec

    assert bundle.input.channel_order is None  # RGB, and not written back
    with pytest.raises(ValueError, match="input.channel_order BGR needs 3 channels"):
        InputSpec(shape=(1, 28, 28), channel_order="BGR")


# ---- --upstream: the signature from a running MLServer -------------------------------------
# ---- a Triton model repository's model directory as the source ----------------------------------
def triton_dir(root: Path, onnx_file: Path, *, fmt: str = "FORMAT_NHWC", dims=(32, 32, 3), platform="onnxruntime_onnx",
               labels: int = 10, extra: str = "") -> Path:
    """``root/repo/garments``: config.pbtxt (max_batch_size 16, so ``dims`` are per item), version 1 an
    unreadable file, version 2 ``onnx_file``, labels.txt with ``labels`` names."""
    d = root / "repo" / "garments"
    (d / "1").mkdir(parents=True)
    (d / "2").mkdir()
    (d / "1" / "model.onnx").write_bytes(b"not a model")  # the older version: never read unless asked for
    (d / "2" / "model.onnx").write_bytes(onnx_file.read_bytes())
    (d / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(labels)))
    (d / "config.pbtxt").write_text(f"""
        name: "garments"
        platform: "{platform}"
        max_batch_size: 16
        input [ {{ name: "input" data_type: TYPE_FP32 format: {fmt} dims: [ {", ".join(map(str, dims))} ] }} ]
        output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" }} ]
        dynamic_batching {{ max_queue_delay_microseconds: 100 }}
        {extra}
    """)
    return d


def test_a_triton_model_directory_imports_with_what_its_configuration_says(models, tmp_path, capsys):
    """The configuration gives the layout (FORMAT_NHWC), the served name, the logits output and the
    class names (label_filename); the newest version directory is imported; a graph with dynamic H/W,
    which --onnx alone refuses, takes its shape from the dims."""
    d = triton_dir(tmp_path, models["nhwc"])
    out = tmp_path / "bundle"
    assert cli(["import", "--triton-model", str(d), "--out", str(out)]) == 0
    assert "version 2" in capsys.readouterr().out
    bundle = Bundle.load(out)
    assert bundle.name == "garments" and bundle.input.layout == "NHWC" and tuple(bundle.input.shape) == (3, 32, 32)
    assert bundle.classes == [f"class-{i}" for i in range(10)] and bundle.spec.backbone.logits_output == "logits"
    source = bundle.spec.provenance["source"]
    assert source["triton_version"] == "2" and source["sha256"] == sha256_file(models["nhwc"])
    assert source["triton_config_sha256"] == sha256_file(d / "config.pbtxt")
    x = images(3, (3, 32, 32))
    want = ort_run(models["nhwc"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))[0]
    np.testing.assert_allclose(ort_run(out / "backbone.onnx", x)[0], want, rtol=1e-5, atol=1e-6)
    # dynamic H/W: the dims say what --input-shape would
    d = triton_dir(tmp_path / "dyn", models["dynhw"], fmt="FORMAT_NCHW", dims=(3, 64, 64),
                   extra='default_model_filename: "model.onnx"')
    assert cli(["import", "--triton-model", str(d), "--out", str(tmp_path / "dyn_bundle"),
                "--logits-output", "logits"]) == 0
    assert tuple(Bundle.load(tmp_path / "dyn_bundle").input.shape) == (3, 64, 64)


def test_a_triton_model_directory_that_cannot_be_imported_is_refused(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(tmp_path, capsys, ["--triton-model", str(tmp_path / "empty")],
            "not a Triton model directory (no config.pbtxt)")
    d = triton_dir(tmp_path / "trt", models["nhwc"], platform="tensorrt_plan")
    refused(tmp_path, capsys, ["--triton-model", str(d)], "'tensorrt_plan' is not ONNX")
    d = triton_dir(tmp_path / "typo", models["nhwc"], extra="max_batch: 4")
    refused(tmp_path, capsys, ["--triton-model", str(d)], "not a Triton model configuration")
    d = triton_dir(tmp_path / "dims", models["nhwc"], dims=(16, 16, 3))
    refused(tmp_path, capsys, ["--triton-model", str(d)], "dims [16, 16, 3] contradict the graph's axis 1 = 32")
    d = triton_dir(tmp_path / "layout", models["nhwc"])
    refused(tmp_path, capsys, ["--triton-model", str(d), "--layout", "NCHW"], "--layout NCHW contradicts")
    refused(tmp_path, capsys, ["--triton-model", str(d), "--model-version", "7"], "version 7 has no model.onnx")
    refused(tmp_path, capsys, ["--triton-model", str(d), "--model-version", "1"], "not a valid ONNX model")
    d = triton_dir(tmp_path / "labels", models["nhwc"], labels=9)
    refused(tmp_path, capsys, ["--triton-model", str(d)], "9 class names ('class-0', ...) for a logits output of 10")


def test_upstream_import_reads_mlserver_metadata_and_serves_through_it(models, tmp_path, capsys):
    server = harness.MLServerProcess(tmp_path / "mlserver", {"cnn32": {"onnx": models["cnn32"]}})
    server.start()
    try:
        out = tmp_path / "up"
        assert cli(["import", "--upstream", server.url, "--model", "cnn32", "--out", str(out)]) == 0
        bundle = Bundle.load(out)
        bb = bundle.spec.backbone
        assert bb.onnx is None and bb.upstream.url == server.url and bb.upstream.model_name == "cnn32"
        assert tuple(bundle.input.shape) == (3, 32, 32) and len(bundle.classes) == 10 and bundle.name == "cnn32"
        assert not has_twin(bundle) and not (out / "backbone.onnx").exists()
        with pytest.raises(NoTwin, match="model server"):
            load_backbone(bundle)
        with pytest.raises(BundleError, match="no ONNX file.*backend.kind: upstream"):
            bundle.onnx_path()
        with pytest.raises(BundleError, match="no ONNX file"):
            LoopbackProxy(out, {"stages": []})  # the in-process backend needs the ONNX file: refused
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "absent"], "ModelMetadata failed")

        x = images(3, (3, 32, 32))
        proxy = LoopbackProxy(out, {"stages": [{"name": "median", "kind": "median"}]},
                              {"backend": {"kind": "upstream", "upstream": {"url": server.url}}})
        try:
            got, verdict = triton_logits(proxy.url, "cnn32", x)
        finally:
            proxy.stop()
        assert got.shape == (3, 10) and np.isfinite(got).all()
        np.testing.assert_array_equal(verdict, np.zeros(3, dtype=np.int32))
        plain = LoopbackProxy(out, {"stages": []}, {"backend": {"kind": "upstream", "upstream": {"url": server.url}}})
        try:
            np.testing.assert_allclose(triton_logits(plain.url, "cnn32", x)[0], ort_run(models["cnn32"], x)[0],
                                       rtol=1e-5, atol=1e-6)
        finally:
            plain.stop()
    finally:
        server.stop()


def test_a_uint8_model_in_mlserver_gets_levels_from_the_proxy(tmp_path, capsys):
    """A UINT8 model served by a real MLServer (its metadata declares UINT8): imported from the server
    and from its ONNX file, the proxy in front of it sends every batch as levels; a client's UINT8
    request and its FP32 pixels get what the model answers on those levels."""
    src = export(make(Levels), tmp_path / "levels.onnx", (32, 32, 3), uint8=True)
    server = harness.MLServerProcess(tmp_path / "mlserver", {"levels": {"onnx": src}})
    server.start()
    try:
        assert cli(["import", "--upstream", server.url, "--model", "levels", "--out", str(tmp_path / "up")]) == 0
        assert "takes UINT8 levels" in capsys.readouterr().out
        import_onnx(src, tmp_path / "file", name="levels")
        sent = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
        want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["logits"], {"input": sent})[0]
        upstream = {"backend": {"kind": "upstream", "upstream": {"url": server.url}}}
        for bundle in (tmp_path / "up", tmp_path / "file"):
            for arr in (sent, sent / np.float32(255.0)):  # UINT8, and FP32 pixels
                np.testing.assert_allclose(served(bundle, arr, [], "logits", upstream), want, rtol=1e-5, atol=1e-6)
    finally:
        server.stop()


class TritonStyle(scripted.ScriptedUpstream):
    """The scripted upstream (``logits[i, k] = mean(x[i]) + k``) declaring its metadata as
    ``meta`` says: Triton leaves the batch axis out when the model has ``max_batch_size > 0``."""

    def __init__(self, inputs: list[dict], outputs: list[dict]):
        super().__init__()
        self.inputs, self.outputs = inputs, outputs

    def ModelMetadata(self, request, context):
        if request.name != "formula":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        resp = pb.ModelMetadataResponse(name="formula", versions=["1"], platform="tensorrt_plan")
        for t in self.inputs:
            resp.inputs.add(**t)
        for t in self.outputs:
            resp.outputs.add(**t)
        return resp


def via_upstream(bundle: Path, server: "TritonStyle", x: np.ndarray) -> np.ndarray:
    """``x`` sent by tritonclient to a proxy serving ``bundle`` in front of ``server``: its logits."""
    proxy = LoopbackProxy(bundle, {"stages": []}, {"backend": {"kind": "upstream", "upstream": {"url": server.url}}})
    try:
        with tc.InferenceServerClient(proxy.url) as client:
            inp = tc.InferInput("pixels", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("formula", [inp]).as_numpy("logits")
    finally:
        proxy.stop()


class Recording(TritonStyle):
    """A Triton-style upstream whose model takes items of ``shape`` (default [4, 4, 1], channels last);
    keeps the last request's input values."""

    def __init__(self, shape=(4, 4, 1)):
        super().__init__([{"name": "pixels", "datatype": "FP32", "shape": list(shape)}],
                         [{"name": "logits", "datatype": "FP32", "shape": [scripted.K]}])
        self.seen = None

    def ModelInfer(self, request, context):
        t = request.inputs[0]
        self.seen = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(t.shape)).copy()
        return super().ModelInfer(request, context)


def test_channels_last_upstream_model_is_served_nhwc_on_both_sides(tmp_path):
    """Imported from a server that declares [?, 4, 4, 1]: the bundle is (1, 4, 4) NHWC, clients send
    NHWC, and the upstream gets exactly those pixels in that order (decoded to NCHW for the
    pipeline, encoded back)."""
    server = Recording().start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t")
        assert tuple(bundle.input.shape) == (1, 4, 4) and bundle.input.layout == "NHWC"
        x = np.random.default_rng(0).random((3, 4, 4, 1), dtype=np.float32)
        x[:, 0, 1, 0] = 0.9  # not symmetric: a transposed batch would not come back equal
        got = via_upstream(tmp_path / "t", server, x)
        np.testing.assert_array_equal(server.seen, x)
        np.testing.assert_allclose(got, scripted.formula_logits(x), rtol=1e-6)
    finally:
        server.stop()


class SoftmaxUpstream(TritonStyle):
    """A Triton-style upstream whose model ends in a softmax: it answers ``softmax(formula_logits)``."""

    def __init__(self):
        super().__init__([{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 4, 4]}],
                         [{"name": "logits", "datatype": "FP32", "shape": [-1, scripted.K]}])

    def ModelInfer(self, request, context):
        resp = super().ModelInfer(request, context)
        z = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(-1, scripted.K)
        resp.raw_output_contents[0] = softmax_np(z).astype("<f4").tobytes()
        return resp


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_a_softmax_upstream_is_read_through_its_logarithms(tmp_path):
    """``--upstream ... --output-kind probabilities``: the upstream backend hands the pipeline the
    logarithms of the upstream's probabilities, and a client gets those probabilities back."""
    from robustgate.proxy.backends.upstream import UpstreamBackend

    server = SoftmaxUpstream().start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t", output_kind="probabilities")
        assert bundle.spec.backbone.output_kind == "probabilities"
        x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
        want = softmax_np(scripted.formula_logits(x))
        backend = UpstreamBackend(url=server.url, model_name="formula", probabilities=True)
        try:
            np.testing.assert_allclose(backend.infer(x), np.log(want), rtol=1e-5)
        finally:
            backend.close()
        np.testing.assert_allclose(via_upstream(tmp_path / "t", server, x), want, rtol=1e-5)
    finally:
        server.stop()


def test_a_bgr_upstream_gets_what_its_clients_sent(tmp_path):
    """``--upstream ... --channel-order BGR``: the pipeline sees RGB, the upstream gets the client's BGR
    values again, FP32 or as UINT8 levels."""
    server = Recording((3, 4, 4)).start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t", channel_order="BGR")
        assert bundle.input.channel_order == "BGR"
        sent = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
        via_upstream(tmp_path / "t", server, sent)
        np.testing.assert_array_equal(server.seen, sent)
    finally:
        server.stop()
    server = TypedUpstream("UINT8", shape=(3, 4, 4)).start()
    try:
        import_upstream(server.url, "formula", tmp_path / "u", channel_order="BGR")
        levels = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
        via_upstream(tmp_path / "u", server, levels / np.float32(255.0))
        np.testing.assert_array_equal(server.seen, levels)
    finally:
        server.stop()
    server = Recording().start()  # one channel
    try:
        with pytest.raises(ImportRefused, match="BGR needs an input with 3 channels"):
            import_upstream(server.url, "formula", tmp_path / "g", channel_order="BGR")
        assert not (tmp_path / "g").exists()
    finally:
        server.stop()


def test_an_upstream_that_takes_normalized_values_gets_them(tmp_path):
    """``--upstream ... --mean --std``: clients send normalized values, the pipeline sees pixels, and
    the upstream receives the client's values again."""
    server = Recording((1, 4, 4)).start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t", mean=(0.5,), std=(0.25,))
        assert bundle.input.normalized and bundle.input.mean == (0.5,) and bundle.input.std == (0.25,)
        x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
        sent = (x - 0.5) / 0.25
        got = via_upstream(tmp_path / "t", server, sent)
        np.testing.assert_allclose(server.seen, sent, atol=1e-6)
        np.testing.assert_allclose(got, scripted.formula_logits(sent), atol=1e-5)
    finally:
        server.stop()


WIRE = {"FP32": "<f4", "FP16": "<f2", "UINT8": "u1"}


class TypedUpstream(TritonStyle):
    """A Triton-style upstream whose model takes ``datatype`` (FP16: a model converted for the GPU;
    UINT8: levels, a model camera pipelines feed) and answers ``formula_logits`` of what it got in
    ``answers``; keeps the last request's input."""

    def __init__(self, datatype: str, answers: str = "FP32", shape=(1, 4, 4)):
        super().__init__([{"name": "pixels", "datatype": datatype, "shape": [-1, *shape]}],
                         [{"name": "logits", "datatype": answers, "shape": [-1, scripted.K]}])
        self.datatype, self.answers, self.seen = datatype, answers, None

    def ModelInfer(self, request, context):
        t = request.inputs[0]
        if t.datatype != self.datatype:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected {self.datatype}, got {t.datatype}")
        self.seen = np.frombuffer(request.raw_input_contents[0], dtype=WIRE[t.datatype]).reshape(tuple(t.shape)).copy()
        logits = scripted.formula_logits(self.seen.astype(np.float32)).astype(WIRE[self.answers])
        resp = pb.ModelInferResponse(model_name="formula", model_version="1", id=request.id)
        resp.outputs.add(name="logits", datatype=self.answers, shape=list(logits.shape))
        resp.raw_output_contents.append(logits.tobytes())
        return resp


def test_an_fp16_upstream_gets_fp16_and_is_read_as_fp32(tmp_path):
    """A model server that declares FP16 (Triton's onnxruntime or TensorRT backend with an FP16
    model): the upstream backend sends each batch in FP16 and reads FP16 logits as FP32."""
    server = TypedUpstream("FP16", "FP16").start()
    try:
        import_upstream(server.url, "formula", tmp_path / "t")
        x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
        got = via_upstream(tmp_path / "t", server, x)
        np.testing.assert_array_equal(server.seen, x.astype(np.float16))
        want = scripted.formula_logits(x.astype(np.float16).astype(np.float32)).astype(np.float16)
        np.testing.assert_array_equal(got, want.astype(np.float32))
    finally:
        server.stop()


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_a_uint8_upstream_gets_the_pixels_as_levels(tmp_path, capsys, value_range):
    """A model server that declares a UINT8 input (a Triton model fed by camera pipelines): the import
    takes it, and the upstream backend sends each batch as levels 0..255 spanning the value range,
    rounded half up: a client's UINT8 request reaches it unchanged, FP32 pixels on the nearest level."""
    server = TypedUpstream("UINT8").start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t", value_range=value_range)
        assert any("takes UINT8 levels" in n for n in bundle.spec.provenance["import_notes"])
        lo, hi = value_range
        sent = np.random.default_rng(0).integers(0, 256, (3, 1, 4, 4)).astype(np.uint8)
        upstream = {"backend": {"kind": "upstream", "upstream": {"url": server.url}}}
        got = served(tmp_path / "t", sent, [], "logits", upstream)
        np.testing.assert_array_equal(server.seen, sent)
        np.testing.assert_allclose(got, scripted.formula_logits(sent.astype(np.float32)), rtol=1e-6)
        x = (lo + (hi - lo) * (sent + np.float32(0.3)) / 255).astype(np.float32)  # between levels, nearer k
        via_upstream(tmp_path / "t", server, x)
        np.testing.assert_array_equal(server.seen, sent)
    finally:
        server.stop()


class ConvHeadUpstream(TritonStyle):
    """A Triton-style upstream (batch axis left out of its metadata) whose model answers [M, K, 1, 1]."""

    def __init__(self):
        super().__init__([{"name": "pixels", "datatype": "FP32", "shape": [1, 4, 4]}],
                         [{"name": "logits", "datatype": "FP32", "shape": [scripted.K, 1, 1]}])

    def ModelInfer(self, request, context):
        resp = super().ModelInfer(request, context)
        resp.outputs[0].shape.extend([1, 1])  # [M, K] -> [M, K, 1, 1], the same values
        return resp


def test_an_upstream_that_answers_batch_classes_1_1_is_read_as_batch_classes(tmp_path):
    server = ConvHeadUpstream().start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t")
        assert len(bundle.classes) == scripted.K
        x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
        np.testing.assert_allclose(via_upstream(tmp_path / "t", server, x), scripted.formula_logits(x), rtol=1e-6)
    finally:
        server.stop()


def test_upstream_metadata_without_the_batch_axis_and_refusals(tmp_path, capsys):
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [1, 4, 4]}
    server = TritonStyle([pixels], [{"name": "logits", "datatype": "FP32", "shape": [scripted.K]}]).start()
    try:
        bundle = import_upstream(server.url, "formula", tmp_path / "t", value_range=(0.0, 255.0))
        assert tuple(bundle.input.shape) == (1, 4, 4) and bundle.input.name == "pixels" and len(bundle.classes) == 10
        assert bundle.spec.backbone.upstream.platform == "tensorrt_plan" and bundle.input.value_range == (0.0, 255.0)
        x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
        got = via_upstream(tmp_path / "t", server, x)
        np.testing.assert_allclose(got, scripted.formula_logits(x), rtol=1e-6)

        server.inputs = [{**pixels, "shape": [1, 1, 4, 4]}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula"], "fixed batch dimension of 1")
        server.inputs = [{**pixels, "shape": [-1, -1, -1, -1]}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula"], "--input-shape C,H,W")
        server.inputs = [{**pixels, "datatype": "INT32"}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula"], "is INT32")
        server.inputs = [{**pixels, "datatype": "UINT8"}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula", "--mean", "0.5", "--std", "0.2"],
                "takes UINT8 levels")
        server.inputs = [pixels]
        server.outputs = [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]},
                          {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula"], "one called 'logits'")
        server.outputs = [{"name": "logits", "datatype": "FP32", "shape": [-1, 10, 2]}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula"], "must be [batch, classes]")
        server.outputs = [{"name": "logits", "datatype": "FP32", "shape": [scripted.K]}]
        server.inputs = [{**pixels, "shape": [-1, 3, 4, 3]}]
        refused(tmp_path, capsys, ["--upstream", server.url, "--model", "formula"], "could both hold channels")
    finally:
        server.stop()
