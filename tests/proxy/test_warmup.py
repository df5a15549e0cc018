"""``server.warmup`` (proxy/warmup.py) on a real proxy: the pipeline runs on synthetic batches of 1 and
``batching.max_batch_size`` items before the port serves, the queue-wait admission starts from the
measured time per item, the stateful stages remember none of those batches, and the answers are
those of a server without it; off by name and by default with an upstream backend; a reload whose
new pipeline fails its warm-up is refused and the running pipeline kept."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tritonclient.grpc as tc

from robustgate.proxy.reload import ReloadError

from streams import SMALL_STORE  # tests/helpers

STAGES = [{"name": "sd", "kind": "stateful", "action": "reject", "threshold": 10.0, "store": SMALL_STORE}]


def logits(url: str, x: np.ndarray) -> np.ndarray:
    with tc.InferenceServerClient(url) as client:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("tiny", [inp], headers={"x-client-id": "c1"}).as_numpy("logits")


def test_warm_up_before_serving_seeds_the_admission_and_leaves_no_history(start_proxy, ort_logits, caplog):
    caplog.set_level(logging.INFO, logger="robustgate.proxy")
    p = start_proxy(pipeline={"stages": STAGES}, batching={"max_batch_size": 8, "max_queue_wait_ms": 100})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up: ")]
    assert len(lines) == 1 and [part.split(" in ")[0] for part in lines[0][len("warm-up: "):].split(", ")] == [
        "batch 1", "batch 1", "batch 8", "batch 8"], lines
    assert p.server.batcher.seconds_per_item is not None  # seeded before any client's batch ran
    store = p.server.runner.stores["sd"][1]
    assert store.stats()["entries"] == 0 and store.stats()["clients"] == 0
    x = np.random.default_rng(3).random((1, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(logits(p.url, x), ort_logits(x), rtol=1e-5, atol=1e-6)
    assert store.stats()["entries"] == 1  # the client's query, and only it


def test_warm_up_off_leaves_the_admission_to_the_first_batch(start_proxy, caplog):
    caplog.set_level(logging.INFO, logger="robustgate.proxy")
    p = start_proxy(server={"warmup": False})
    assert not p.server.warmup_enabled and p.server.batcher.seconds_per_item is None
    assert not [r for r in caplog.records if r.getMessage().startswith("warm-up")]


def test_a_reload_whose_pipeline_fails_its_warm_up_is_refused(start_proxy, proxy_bundle, tmp_path, monkeypatch):
    import yaml

    from robustgate.proxy.config import load_config

    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({"bundle": str(proxy_bundle), "pipeline": {"stages": []}}))
    p = start_proxy(pipeline={"stages": STAGES})
    p.server.config_loader = lambda: load_config(path, environ={}, overrides={
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1"}})
    served = p.server.runner

    def broken(runner):
        raise RuntimeError("out of memory on batch 32")

    monkeypatch.setattr(p.server, "warm", broken)
    with pytest.raises(ReloadError, match="failed its warm-up: RuntimeError: out of memory on batch 32"):
        p.call(p.server.reload())
    assert p.server.runner is served
    monkeypatch.undo()
    p.call(p.server.reload())  # warmed, then swapped in
    assert p.server.runner is not served and not p.server.runner.stages
