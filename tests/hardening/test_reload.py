"""Hot reload (issue 9, item 5): ``robustgate.admin.v1.Admin/Reload`` and SIGHUP swap in a re-read
pipeline without dropping requests (proxy/server.py ``ProxyServer.reload``; docs/OPERATIONS.md).

- Under a concurrent stream of distinct requests through the real tritonclient, three reloads move
  a detector threshold (the test-local MeanDetector of tests/proxy/conftest.py: score = mean pixel)
  back and forth, and one refused reload happens in between: every request is answered OK or
  PERMISSION_DENIED, the server counted exactly the answers the clients got, and every answer is
  its own request's (logits = ONNX Runtime on its images, score = its items' mean) under a threshold
  that was in force while it was in flight; requests sent after a reload are judged by the new one.
- Thresholds, actions, stage params and the verdict mode all follow a reload; a changed restart-only
  section (batching) is reported in ``ignored`` and not applied.
- A bad new config -- unknown key, renamed detector stage, unknown defense, invalid YAML, missing
  file, another or a missing bundle, a tampered artifact -- is refused with FAILED_PRECONDITION,
  the old pipeline keeps serving and ``robustgate_reloads_total{result="error"}`` counts it.
- A real ``robustgate serve --config FILE`` process (the shipped bundle with its fitted MagNet)
  gets SIGHUP after its config file was edited: the new threshold decides, a broken edit is refused
  and counted, restoring the file restores the verdict, and requests keep flowing throughout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as tc
import yaml
from google.protobuf import empty_pb2, json_format, struct_pb2
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from harness import wait_until  # tests/proxy/upstream (pytest pythonpath)
from robustgate.defenses.base import build
from robustgate.proxy.config import load_config

REPO = Path(__file__).resolve().parents[2]
RELOAD = "/robustgate.admin.v1.Admin/Reload"
# the admin service on its own loopback port (it is off by default) and rejections that name the
# score and threshold (server.explain; off by default): these tests read both
ADMIN = {"admin": {"enabled": True, "port": 0}, "explain": True}
SERVER = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1", **ADMIN}
DENIED = re.compile(r"^rejected by robustgate: item (\d+) stage (\S+) score (\S+) threshold (\S+)$")
OLD, NEW = 0.5, 0.35  # MeanDetector thresholds; items of mean 0.42 lie between them


def brightness(threshold: float, action: str = "reject") -> dict:
    return {"name": "brightness", "kind": "test_proxy_mean", "action": action, "threshold": threshold}


def write_config(path: Path, bundle: Path, stages: list[dict], **sections) -> Path:
    path.write_text(yaml.safe_dump({"bundle": str(bundle), "server": SERVER,
                                    "pipeline": {"stages": stages, **sections.pop("pipeline", {})}, **sections}))
    return path


def admin_url(proxy) -> str:
    return f"127.0.0.1:{proxy.server.admin_port}"


def reload_rpc(url: str) -> dict:
    with grpc.insecure_channel(url) as ch:
        call = ch.unary_unary(RELOAD, request_serializer=empty_pb2.Empty.SerializeToString,
                              response_deserializer=struct_pb2.Struct.FromString)
        return json_format.MessageToDict(call(empty_pb2.Empty(), timeout=60))


def refused_reload(url: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        reload_rpc(url)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    details = err.value.details()
    assert details.startswith("reload refused, the running pipeline is kept: "), details
    return details


def served_by(proxy, path: Path):
    """Gives the in-process proxy what `robustgate serve --config` gives it: re-read the file."""
    proxy.server.config_loader = lambda: load_config(path, environ={})


def images_of_mean(means, rng: np.random.Generator) -> np.ndarray:
    """One [1, 28, 28] image per mean: uniform noise of width 0.4 around it -> [n, 1, 28, 28] float32."""
    x = np.stack([m + (rng.random((1, 28, 28), dtype=np.float32) - 0.5) * 0.4 for m in means])
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def item_means(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).mean(dim=(1, 2, 3)).numpy()  # [n], as the detector computes them


def infer(client: tc.InferenceServerClient, x: np.ndarray, model: str = "tiny"):
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], client_timeout=60)


def denied(fn) -> tuple[int, str, float, float]:
    """The PERMISSION_DENIED that ``fn`` raises, parsed: (item, stage, score, threshold)."""
    with pytest.raises(InferenceServerException) as err:
        fn()
    assert err.value.status() == "StatusCode.PERMISSION_DENIED", err.value
    m = DENIED.match(err.value.message())
    assert m, err.value.message()
    return int(m[1]), m[2], float(m[3]), float(m[4])


# ---- (a) a concurrent stream across reloads -------------------------------------------------------
@dataclass
class Answer:
    x: np.ndarray
    sent: float
    done: float
    status: str
    message: str
    logits: np.ndarray | None = None
    scores: np.ndarray | None = None


class Stream:
    """Client threads sending 1-3 items of mean 0.2 (always accepted), 0.42 (between the thresholds)
    or 0.7 (always rejected), each request new random images, until stop()."""

    def __init__(self, url: str, threads: int = 4):
        self.url = url
        self.answers: list[Answer] = []
        self.errors: list[BaseException] = []
        self._lock, self.halt = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with tc.InferenceServerClient(self.url) as client:
                while not self.halt.is_set():
                    n = int(rng.integers(1, 4))
                    x = images_of_mean(rng.choice([0.2, 0.42, 0.7], size=n, p=[0.45, 0.45, 0.1]), rng)
                    sent = time.monotonic()
                    try:
                        r = infer(client, x)
                        a = Answer(x, sent, time.monotonic(), "OK", "", r.as_numpy("logits"),
                                   r.as_numpy("robustgate_score_brightness"))
                    except InferenceServerException as exc:
                        a = Answer(x, sent, time.monotonic(), str(exc.status()).removeprefix("StatusCode."), exc.message())
                    with self._lock:
                        self.answers.append(a)
        except BaseException as exc:  # re-raised by stop()
            self.errors.append(exc)

    def sent_after(self, t: float) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.sent > t)

    def wait_answers_after(self, t: float, n: int) -> None:
        wait_until(lambda: self.sent_after(t) >= n or bool(self.errors), what=f"{n} answers after t={t}")
        if self.errors:
            raise self.errors[0]

    def stop(self) -> list[Answer]:
        self.halt.set()
        for t in self._threads:
            t.join(timeout=70)
            assert not t.is_alive(), "a client thread hung"
        if self.errors:
            raise self.errors[0]
        return list(self.answers)


def thresholds_in_force(segments, sent: float, done: float) -> set[float]:
    """``segments``: (from, to, {thresholds}) covering the timeline; those overlapping [sent, done]."""
    return set().union(*(ths for lo, hi, ths in segments if lo <= done and sent <= hi))


def consistent(a: Answer, t: float, ort_logits) -> bool:
    """Whether ``a`` is exactly what its own request gets under threshold ``t`` (request mode)."""
    means = item_means(a.x)
    over = np.flatnonzero(means > t)
    if over.size == 0:
        return (a.status == "OK" and np.allclose(a.logits, ort_logits(a.x), rtol=1e-5, atol=1e-6)
                and np.allclose(a.scores, means, rtol=1e-5, atol=1e-6))
    m = DENIED.match(a.message)
    return (a.status == "PERMISSION_DENIED" and m is not None and int(m[1]) == over[0] and m[2] == "brightness"
            and np.isclose(float(m[3]), means[over[0]], rtol=1e-5) and np.isclose(float(m[4]), t, rtol=1e-6))


def test_reloads_under_a_concurrent_stream_drop_nothing(start_proxy, proxy_bundle, ort_logits, tmp_path):
    path = write_config(tmp_path / "proxy.yaml", proxy_bundle, [brightness(OLD)])
    p = start_proxy(server=ADMIN, pipeline={"stages": [brightness(OLD)]})
    served_by(p, path)
    stream = Stream(p.url)
    segments, current, last = [], OLD, float("-inf")
    try:
        for new in (NEW, OLD, "bad", NEW):
            stream.wait_answers_after(last, 25)
            if new == "bad":  # refused mid-stream: the segment goes on with the same threshold
                path.write_text(path.read_text().replace("pipeline:", "pipeline:\n  thresholds: {brightness: 0.1}"))
                refused_reload(admin_url(p))
                continue
            write_config(path, proxy_bundle, [brightness(new)])
            start = time.monotonic()
            summary = reload_rpc(admin_url(p))
            end = time.monotonic()
            assert summary == {"thresholds": {"brightness": new}, "actions": {"brightness": "reject"},
                               "failure_policy": "fail-closed", "verdict_mode": "request", "ignored": []}
            segments += [(last, start, {current}), (start, end, {current, new})]
            current, last = new, end
        stream.wait_answers_after(last, 25)
        answers = stream.stop()
    finally:
        stream.halt.set()
    segments.append((last, float("inf"), {current}))

    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {"OK", "PERMISSION_DENIED"}, statuses
    wrong = [a for a in answers if not any(consistent(a, t, ort_logits) for t in thresholds_in_force(segments, a.sent, a.done))]
    assert not wrong, f"{len(wrong)} of {len(answers)} answers fit no threshold in force, e.g. {wrong[0].message!r}"
    # the threshold decided: discriminating requests (an item of mean 0.42, none of 0.7) answered wholly
    # inside one segment went the way of that segment's threshold, in every segment
    for lo, hi, ths in segments[::2]:
        (t,) = ths
        inside = [a for a in answers if lo < a.sent and a.done < hi
                  and (item_means(a.x) > NEW).any() and not (item_means(a.x) > OLD).any()]
        assert inside, f"no discriminating request between {lo} and {hi}"
        assert all(a.status == ("OK" if t == OLD else "PERMISSION_DENIED") for a in inside), (t, Counter(a.status for a in inside))
    reg = p.server.metrics.registry
    served = sum(reg.get_sample_value("robustgate_requests_total", {"outcome": o}) for o in ("accepted", "rejected"))
    assert served == len(answers) == sum(statuses.values())
    assert reg.get_sample_value("robustgate_reloads_total", {"result": "ok"}) == 3
    assert reg.get_sample_value("robustgate_reloads_total", {"result": "error"}) == 1


def test_reload_applies_actions_params_and_verdict_mode_not_batching(start_proxy, proxy_bundle, ort_logits, tmp_path):
    stages = [brightness(OLD), {"name": "squeeze", "kind": "bitdepth", "params": {"bits": 8}}]
    p = start_proxy(server=ADMIN, pipeline={"stages": stages}, batching={"max_batch_size": 32})
    x = images_of_mean([0.2, 0.6], np.random.default_rng(0))  # item 1 over both thresholds
    client = tc.InferenceServerClient(p.url)
    assert denied(lambda: infer(client, x))[:2] == (1, "brightness")

    path = write_config(tmp_path / "proxy.yaml", proxy_bundle,
                        [brightness(0.3, action="flag"), {"name": "squeeze", "kind": "bitdepth", "params": {"bits": 2}}],
                        pipeline={"verdict_mode": "item", "failure_policy": "fail-open"}, batching={"max_batch_size": 4})
    served_by(p, path)
    summary = reload_rpc(admin_url(p))
    assert summary == {"thresholds": {"brightness": 0.3}, "actions": {"brightness": "flag", "squeeze": "reject"},
                       "failure_policy": "fail-open", "verdict_mode": "item", "ignored": ["batching"]}
    r = infer(client, x)
    want = ort_logits(build("bitdepth", bits=2).purify(torch.from_numpy(x)).numpy())
    np.testing.assert_allclose(r.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r.as_numpy("robustgate_verdict"), [0, 1])  # flagged now, not rejected
    assert r.get_response().parameters["robustgate_reasons"].string_param == ",brightness"
    assert p.server.batcher.max_batch_size == 32  # restart-only: reported, not applied


# ---- (b) refused reloads --------------------------------------------------------------------------
def _tamper(bundle: Path) -> None:
    f = bundle / "backbone.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _edit_spec(bundle: Path, section: str, key: str, value) -> None:
    f = bundle / "bundle.yaml"
    spec = yaml.safe_load(f.read_text())
    spec[section][key] = value
    f.write_text(yaml.safe_dump(spec))


BAD = {  # name -> (edit(config_path, served_bundle), a phrase the refusal must contain)
    "unknown key": (lambda c, b: c.write_text(c.read_text().replace("pipeline:", "pipeline:\n  thresholds: 1")),
                    "pipeline.thresholds"),
    "renamed detector stage": (lambda c, b: write_config(c, b, [{**brightness(NEW), "name": "brightness2"}]),
                               "differ from the served ones ['brightness']"),
    "unknown defense kind": (lambda c, b: write_config(c, b, [brightness(NEW), {"name": "z", "kind": "no_such_defense"}]),
                             "no_such_defense"),
    "invalid yaml": (lambda c, b: c.write_text("pipeline: [unclosed\n"), "not valid YAML"),
    "config file deleted": (lambda c, b: c.unlink(), "does not exist"),
    "another bundle": (lambda c, b: write_config(c, b.parent / "elsewhere", [brightness(NEW)]),
                       "is not the served bundle"),
    "served bundle gone": (lambda c, b: (b / "bundle.yaml").unlink(), "no bundle.yaml"),
    "tampered bundle": (lambda c, b: _tamper(b), "checksum mismatch for backbone.onnx"),
    # restart-only: the backend converts at load, the codec's contract is built at start
    "output kind changed": (lambda c, b: _edit_spec(b, "backbone", "output_kind", "probabilities"),
                            "backbone.output_kind changed"),
    "input changed": (lambda c, b: _edit_spec(b, "input", "value_range", [0.0, 255.0]), "the bundle's input changed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_new_config_is_refused_and_the_old_pipeline_serves(start_proxy, proxy_bundle, ort_logits, tmp_path, case):
    bundle = tmp_path / "bundle"
    shutil.copytree(proxy_bundle, bundle)
    path = write_config(tmp_path / "proxy.yaml", bundle, [brightness(OLD)])
    p = start_proxy(bundle=bundle, server=ADMIN, pipeline={"stages": [brightness(OLD)]})
    served_by(p, path)
    reg = p.server.metrics.registry
    edit, needle = BAD[case]
    if case != "unknown key":  # the unknown key goes into a file that is otherwise the one to apply
        write_config(path, bundle, [brightness(NEW)])
    edit(path, bundle)
    details = refused_reload(admin_url(p))
    assert needle in details, details
    assert reg.get_sample_value("robustgate_reloads_total", {"result": "error"}) == 1
    assert reg.get_sample_value("robustgate_reloads_total", {"result": "ok"}) == 0
    assert p.server.pipeline_summary()["thresholds"] == {"brightness": OLD}
    # still the old pipeline: 0.42 passes (0.5), 0.7 is rejected against 0.5
    rng = np.random.default_rng(3)
    client = tc.InferenceServerClient(p.url)
    x = images_of_mean([0.42, 0.2], rng)
    np.testing.assert_allclose(infer(client, x).as_numpy("logits"), ort_logits(x), rtol=1e-5, atol=1e-6)
    bright = images_of_mean([0.7], rng)
    item, stage, score, threshold = denied(lambda: infer(client, bright))
    assert (item, stage, threshold) == (0, "brightness", OLD) and score == pytest.approx(item_means(bright)[0], rel=1e-5)


# ---- (c) SIGHUP to a real `robustgate serve` ------------------------------------------------------
def scrape(port: int, name: str, labels: dict) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_sighup_reloads_a_real_serve_process(tmp_path, fmnist_subset):
    bundle = REPO / "bundles" / "default"
    magnet = {"name": "magnet_l1", "kind": "magnet", "action": "reject", "params": {"runtime": "onnx"}}
    path = write_config(tmp_path / "proxy.yaml", bundle, [magnet])
    original = path.read_text()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTGATE_")}
    env["ROBUSTGATE_SERVER__WORKERS"] = "1"  # counts one process's reloads (N = 2: tests/proxy/test_workers.py)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "robustgate.proxy.cli", "serve", "--config", str(path),
                                 "--port", "0", "--metrics-port", "0"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    stream = None
    try:
        wait_until(lambda: "robustgate: serving" in log.read_text() or proc.poll() is not None, timeout_s=180,
                   what="robustgate serve to start")
        m = re.search(r"serving (\S+) on port (\d+), metrics on port (\d+)", log.read_text())
        assert m, log.read_text()[-3000:]
        model, url, metrics_port = m[1], f"127.0.0.1:{m[2]}", int(m[3])
        client = tc.InferenceServerClient(url)
        x, _ = fmnist_subset("test", 64)
        x = x.numpy()  # [64, 1, 28, 28]
        sess = ort.InferenceSession(str(bundle / "backbone.onnx"), providers=["CPUExecutionProvider"])
        reference = lambda xs: sess.run(["logits"], {"input": xs})[0]  # noqa: E731

        first = infer(client, x[:8], model)
        verdicts, scores = first.as_numpy("robustgate_verdict"), first.as_numpy("robustgate_score_magnet_l1")
        j = int(np.flatnonzero(verdicts == 0)[0])  # a clean image the calibrated threshold accepts
        one, s = x[j:j + 1], float(scores[j])
        stream = ServeStream(url, model, x, reference)

        def status_of_one() -> str:
            try:
                infer(client, one, model)
                return "OK"
            except InferenceServerException as exc:
                return str(exc.status())

        # 1. the threshold edited to half this image's score: after SIGHUP it is rejected
        path.write_text(yaml.safe_dump({**yaml.safe_load(original),
                                        "pipeline": {"stages": [{**magnet, "threshold": s / 2}]}}))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: status_of_one() == "StatusCode.PERMISSION_DENIED", what="the new threshold in force")
        item, stage, score, threshold = denied(lambda: infer(client, one, model))
        assert (item, stage) == (0, "magnet_l1")
        assert score == pytest.approx(s, rel=1e-5) and threshold == pytest.approx(s / 2, rel=1e-5)
        assert scrape(metrics_port, "robustgate_reloads_total", {"result": "ok"}) == 1

        # 2. a broken edit: refused, counted, the running pipeline kept
        path.write_text(original.replace("pipeline:", "pipeline:\n  bogus: 1"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: scrape(metrics_port, "robustgate_reloads_total", {"result": "error"}) == 1,
                   what="the refused reload counted")
        assert denied(lambda: infer(client, one, model))[3] == pytest.approx(s / 2, rel=1e-5)
        assert "reload refused" in log.read_text() and "pipeline.bogus" in log.read_text()

        # 3. the original file back: the calibrated threshold accepts the image again
        path.write_text(original)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: status_of_one() == "OK", what="the calibrated threshold back")
        np.testing.assert_allclose(infer(client, one, model).as_numpy("logits"), reference(one), rtol=1e-4, atol=1e-4)
        assert scrape(metrics_port, "robustgate_reloads_total", {"result": "ok"}) == 2
        answers = stream.stop()
        assert proc.poll() is None, "the server died"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if stream is not None:
            stream.halt.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # requests kept flowing across the three SIGHUPs: each answered, with its own logits when served
    assert set(answers) <= {"OK", "PERMISSION_DENIED"} and answers["OK"] > 0, answers
    assert stream.mismatches == 0


class ServeStream:
    """Two client threads sending random 1-4 image requests from ``x`` until stop(); OK answers are
    checked against ``reference``. stop() returns the statuses."""

    def __init__(self, url: str, model: str, x: np.ndarray, reference):
        self.statuses: Counter = Counter()
        self.mismatches = 0
        self.errors: list[BaseException] = []
        self.halt = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(url, model, x, reference, i), daemon=True)
                         for i in range(2)]
        for t in self._threads:
            t.start()

    def _run(self, url, model, x, reference, seed) -> None:
        rng = np.random.default_rng(seed)
        try:
            with tc.InferenceServerClient(url) as client:
                while not self.halt.is_set():
                    xs = x[rng.choice(len(x), size=int(rng.integers(1, 5)), replace=False)]
                    try:
                        got, status = infer(client, xs, model).as_numpy("logits"), "OK"
                    except InferenceServerException as exc:
                        got, status = None, str(exc.status()).removeprefix("StatusCode.")
                    with self._lock:
                        self.statuses[status] += 1
                        if got is not None and not np.allclose(got, reference(xs), rtol=1e-4, atol=1e-4):
                            self.mismatches += 1
        except BaseException as exc:  # re-raised by stop()
            self.errors.append(exc)

    def stop(self) -> Counter:
        self.halt.set()
        for t in self._threads:
            t.join(timeout=70)
            assert not t.is_alive(), "a client thread hung"
        if self.errors:
            raise self.errors[0]
        return self.statuses
