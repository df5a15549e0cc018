"""``server.workers: 2`` (proxy/workers.py): two serving processes on one port under a supervisor, a
real ``robustgate serve`` subprocess and real clients: both workers answer, the metrics port serves
their sum, SIGTERM drains both without losing a request, and a reload (SIGHUP, the admin RPC) reaches
both."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import empty_pb2, struct_pb2

from tritonclient.utils import InferenceServerException

from replica import WORKERS, Replica  # tests/helpers
from scrape import scrape  # tests/helpers
from streams import SMALL_STORE, attack_stream, fmnist_images  # tests/helpers
from robustgate.proxy.workers import (cgroup_cpus, cgroup_memory, default_threads, default_workers, gpu_devices,
                                      per_process_state, physical_cores, resolved_workers, worker_config,
                                      worker_memory)
from robustgate.proxy.config import load_config



def infer(url: str, x: np.ndarray) -> np.ndarray:
    """One call on a connection of its own (SO_REUSEPORT spreads connections, not calls; grpc shares
    one connection among a process's channels to the same target unless told not to)."""
    client = tc.InferenceServerClient(url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    try:
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("tiny", [inp]).as_numpy("logits")
    finally:
        client.close()


def counter(port: int, name: str, **labels) -> float:
    return scrape(port).get(name, {}).get(frozenset(labels.items()), 0.0)


def test_two_workers_serve_one_port_and_the_metrics_port_sums_them(tmp_path, proxy_bundle, ort_logits):
    r = Replica(tmp_path, proxy_bundle, stages=[])
    try:
        xs = [np.full((1, 1, 28, 28), (i % 10) / 10, np.float32) for i in range(40)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda x: infer(r.url, x), xs))
        for x, got in zip(xs, answers):
            np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
        per_worker = r.per_worker("robustgate_requests_total", {"outcome": "accepted"})
        assert len(per_worker) == WORKERS and all(v > 0 for v in per_worker.values()), per_worker  # both served
        assert sum(per_worker.values()) == 40
        assert counter(r.metrics_port, "robustgate_requests_total", outcome="accepted") == 40  # merged: the sum
        assert counter(r.metrics_port, "robustgate_items_total", verdict="accepted") == 40
        build = scrape(r.metrics_port)["robustgate_build_info"]
        assert list(build.values()) == [1.0]  # one series (max over the workers), no pid label
        assert list(scrape(r.metrics_port)["robustgate_backend_info"].values()) == [1.0]
        code, rest = r.stop()
        assert code == 0 and "draining" in rest and "stopped" in rest
        # a clean start says nothing alarming: no warning about the supervisor's own variables, none
        # from prometheus-client's multiprocess mode
        assert "WARNING" not in "".join(r.lines) + rest and "Warning" not in "".join(r.lines) + rest
    finally:
        r.kill()


def test_sigterm_drains_both_workers_and_loses_nothing(tmp_path, proxy_bundle, ort_logits):
    r = Replica(tmp_path, proxy_bundle, stages=[{"name": "slow", "kind": "test_proxy_sleep", "params": {"seconds": 0.3}}])
    try:
        xs = [np.full((1, 1, 28, 28), (i % 10) / 10, np.float32) for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(infer, r.url, x) for x in xs]
            for _ in range(600):  # both workers busy, requests queued behind them (refreshed once a second)
                depth = scrape(r.metrics_port)["robustgate_queue_depth"][frozenset()]
                if depth >= 4:
                    break
                time.sleep(0.05)
            assert depth >= 4
            r.proc.send_signal(signal.SIGTERM)
            answers = [f.result(120) for f in futures]  # every in-flight request answered
        assert r.proc.wait(120) == 0
        for x, got in zip(xs, answers):
            np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
        busy = r.per_worker("robustgate_requests_total", {"outcome": "accepted"})
        assert len(busy) == WORKERS and sum(busy.values()) == 12, busy
    finally:
        r.kill()


def _reloads(r: Replica, want: float) -> float:
    for _ in range(300):
        got = counter(r.metrics_port, "robustgate_reloads_total", result="ok")
        if got >= want:
            return got
        time.sleep(0.1)
    return got


def test_reload_reaches_every_worker(tmp_path, proxy_bundle):
    r = Replica(tmp_path, proxy_bundle, stages=[], admin=True)
    try:
        assert _reloads(r, 0) == 0
        r.proc.send_signal(signal.SIGHUP)  # the supervisor relays it to both workers
        assert _reloads(r, WORKERS) == WORKERS
        per_worker = r.per_worker("robustgate_reloads_total", {"result": "ok"})
        assert sorted(per_worker.values()) == [1.0, 1.0]
        with grpc.insecure_channel(f"127.0.0.1:{r.admin_port}") as ch:  # worker 0's admin port
            reload = ch.unary_unary("/robustgate.admin.v1.Admin/Reload", request_serializer=empty_pb2.Empty.SerializeToString,
                                    response_deserializer=struct_pb2.Struct.FromString)
            summary = reload(empty_pb2.Empty(), timeout=60)
        assert summary["failure_policy"] == "fail-closed"
        assert _reloads(r, 2 * WORKERS) == 2 * WORKERS  # the RPC's worker, then the other by relay
        assert sorted(r.per_worker("robustgate_reloads_total", {"result": "ok"}).values()) == [2.0, 2.0]
        code, _ = r.stop()
        assert code == 0
    finally:
        r.kill()


def test_a_bad_bundle_with_workers_exits_2_naming_it(tmp_path, capsys):
    from robustgate.proxy.cli import main as cli_main

    path = _write(tmp_path, {"bundle": str(tmp_path / "nope"),
                             "server": {"workers": 2, "port": 0, "metrics_port": 0, "host": "127.0.0.1"}})
    code = cli_main(["serve", "--config", str(path)])  # the workers fail; the supervisor says why, once
    assert code == 2 and "no bundle.yaml" in capsys.readouterr().err


def _write(tmp_path: Path, data: dict) -> Path:
    import yaml

    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_workers_are_the_cores_capped_by_the_cgroup_quota(tmp_path):
    assert default_workers() <= len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    assert cgroup_cpus(tmp_path / "none") is None


def test_default_workers_are_as_many_as_the_containers_memory_holds(tmp_path, proxy_bundle, caplog, monkeypatch):
    import logging

    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("2147483648\n")
    assert cgroup_memory(tmp_path / "cg") == 2**31
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert cgroup_memory(tmp_path / "cg") is None
    (tmp_path / "v1" / "memory").mkdir(parents=True)
    (tmp_path / "v1" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    assert cgroup_memory(tmp_path / "v1") is None
    assert cgroup_memory(tmp_path / "none") is None

    monkeypatch.setattr("robustgate.proxy.workers.default_workers", lambda: 8)  # an 8-core container ...
    monkeypatch.setattr("robustgate.proxy.workers.available_memory", lambda: 3 * 2**30)  # ... with 3 GiB
    per = worker_memory(proxy_bundle)
    assert per > 512 * 2**20
    cfg = load_config(_write(tmp_path, {"bundle": str(proxy_bundle)}))
    with caplog.at_level(logging.INFO, logger="robustgate.proxy"):
        assert resolved_workers(cfg) == (3 * 2**30 - 64 * 2**20) // per == 5
    assert "server.workers: 5, not the 8 cores" in caplog.text
    monkeypatch.setattr("robustgate.proxy.workers.available_memory", lambda: 64 * 2**30)
    assert resolved_workers(cfg) == 8
    explicit = load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "server": {"workers": 8}}))
    monkeypatch.setattr("robustgate.proxy.workers.available_memory", lambda: 2**30)
    assert resolved_workers(explicit) == 8  # an explicit count wins


def test_a_pipeline_on_a_gpu_defaults_to_one_process_and_an_explicit_count_wins(tmp_path, proxy_bundle, monkeypatch):
    """No CUDA is needed: the choice reads the config; "auto" resolves to what torch sees."""
    import torch

    monkeypatch.setattr("robustgate.proxy.workers.available_memory", lambda: None)  # the cores alone decide

    cpu = load_config(_write(tmp_path, {"bundle": str(proxy_bundle)}))
    assert gpu_devices(cpu) == [] and resolved_workers(cpu) == default_workers()
    on_gpu = load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "pipeline": {"device": "cuda"}}))
    assert gpu_devices(on_gpu) == ["pipeline.device"] and resolved_workers(on_gpu) == 1
    backend = load_config(_write(tmp_path, {"bundle": str(proxy_bundle),
                                            "backend": {"kind": "torch", "torch": {"device": "cuda"}}}))
    assert gpu_devices(backend) == ["backend.torch.device"] and resolved_workers(backend) == 1
    # a device key of a backend that is not the one in use does not count
    unused = load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "backend": {
        "kind": "upstream", "onnxruntime": {"device": "cuda"}}}))
    assert gpu_devices(unused) == []
    auto = load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "pipeline": {"device": "auto"}}))
    assert resolved_workers(auto) == (1 if torch.cuda.is_available() else default_workers())
    explicit = load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "pipeline": {"device": "cuda"},
                                             "server": {"workers": 3}}))
    assert resolved_workers(explicit) == 3


def test_per_process_client_state_defaults_to_one_process_and_an_explicit_count_is_warned(tmp_path, proxy_bundle,
                                                                                          caplog, monkeypatch):
    """Per-client limits in each worker's memory split over N workers (connections, not clients, are
    spread) would give a client with N connections N times its limits: one process unless
    ``server.workers`` is set, and then a warning that names the key. A stateful stage's memory store
    is not per process (the supervisor's store service shares it), so it leaves the default alone."""
    import logging

    monkeypatch.setattr("robustgate.proxy.workers.default_workers", lambda: 4)  # a 4-core container
    monkeypatch.setattr("robustgate.proxy.workers.available_memory", lambda: None)  # whose memory holds them
    stage = {"name": "sq", "kind": "stateful", "action": "log", "params": {"method": "blacklight"}}

    def cfg(**sections):
        return load_config(_write(tmp_path, {"bundle": str(proxy_bundle), **sections}))

    memory = cfg(pipeline={"stages": [stage]})
    assert per_process_state(memory) == [] and resolved_workers(memory) == 4
    explicit_memory = cfg(pipeline={"stages": [{**stage, "store": {"kind": "memory", "max_entries": 1000}}]})
    assert resolved_workers(explicit_memory) == 4
    limits = cfg(limits={"per_client": {"rate_per_s": 5}})
    assert per_process_state(limits) == ["limits.per_client"] and resolved_workers(limits) == 1
    budget = cfg(limits={"per_client": {"budget": 1000}})
    assert per_process_state(budget) == ["limits.per_client"]
    shared_limits = cfg(limits={"per_client": {"budget": 1000, "store": {"kind": "redis", "url": "redis://127.0.0.1:1/0"}}})
    assert per_process_state(shared_limits) == [] and resolved_workers(shared_limits) == 4
    shared = cfg(pipeline={"stages": [{**stage, "store": {"kind": "redis", "url": "redis://127.0.0.1:1/0"}}]})
    assert per_process_state(shared) == [] and resolved_workers(shared) == 4
    assert per_process_state(cfg()) == [] and resolved_workers(cfg()) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustgate.proxy"):
        assert resolved_workers(cfg(limits={"per_client": {"rate_per_s": 5}}, server={"workers": 3})) == 3
    assert "limits.per_client" in caplog.text and "store: {kind: redis}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustgate.proxy"):
        assert resolved_workers(cfg(pipeline={"stages": [stage]}, server={"workers": 3})) == 3
        assert resolved_workers(cfg(limits={"per_client": {"rate_per_s": 5}}, server={"workers": 1})) == 1
    assert caplog.text == ""


def test_worker_config_shares_the_port_and_gives_the_admin_port_to_worker_0(tmp_path, proxy_bundle):
    cfg = load_config(_write(tmp_path, {"bundle": str(proxy_bundle),
                                        "server": {"workers": 3, "admin": {"enabled": True, "port": 0}}}))
    w0, w1 = worker_config(cfg, 0, 5000, 5003), worker_config(cfg, 1, 5000, 5003)
    assert (w0.server.port, w1.server.port) == (5000, 5000)
    assert w0.server.metrics_port is None and w1.server.metrics_port is None
    assert (w0.server.admin.enabled, w0.server.admin.port) == (True, 5003)
    assert w1.server.admin.enabled is False
    with pytest.raises(ValueError, match="server.workers"):
        load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "server": {"workers": 0}}))


def test_a_workers_thread_pools_default_to_its_share_of_the_cores(tmp_path, proxy_bundle):
    share = max(1, default_threads() // 3)
    w = worker_config(load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "server": {"workers": 3}})),
                      1, 5000, None, workers=3)
    assert (w.backend.onnxruntime.intra_op_threads, w.pipeline.purify_threads) == (share, share)
    set_ = load_config(_write(tmp_path, {"bundle": str(proxy_bundle), "server": {"workers": 3},
                                         "backend": {"onnxruntime": {"intra_op_threads": 5}},
                                         "pipeline": {"purify_threads": 7}}))
    w = worker_config(set_, 1, 5000, None, workers=3)
    assert (w.backend.onnxruntime.intra_op_threads, w.pipeline.purify_threads) == (5, 7)  # an explicit count wins


def test_threads_count_physical_cores_among_the_cpus_given(tmp_path):
    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]):  # 2 hyperthreads per core
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores(range(5), tmp_path) == 3
    assert physical_cores([0, 1], tmp_path) == 1 and physical_cores([0, 2], tmp_path) == 2
    assert physical_cores([0, 7], tmp_path) == 2  # no topology for cpu7: the CPUs are counted
    assert 1 <= default_threads() <= default_workers()


def _pinned_threads(pid: int) -> list[str]:
    """The threads of process ``pid`` allowed on fewer CPUs than the process itself."""
    def cpus(task: str) -> str:
        status = Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in status if line.startswith("Cpus_allowed_list"))

    whole = cpus(str(pid))
    return [t for t in os.listdir(f"/proc/{pid}/task") if cpus(t) != whole]


def test_workers_onnx_runtime_pools_are_not_pinned_to_the_same_cores(tmp_path, proxy_bundle, ort_logits):
    # ONNX Runtime's own default pool (intra_op_threads unset) starts a thread per physical core and
    # pins each to its core: every worker's pool on the same cores. intra_op_threads: 0 is each
    # worker's share of the cores instead, as an explicit count, which ONNX Runtime does not pin.
    r = Replica(tmp_path, proxy_bundle, stages=[])
    try:
        x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
        for _ in range(2 * WORKERS):
            np.testing.assert_allclose(infer(r.url, x), ort_logits(x), rtol=1e-5, atol=1e-5)
        pids = [int(f.stem.split("_")[-1]) for f in r.mpdir.glob("counter_*.db")]
        assert len(pids) == WORKERS
        assert {pid: _pinned_threads(pid) for pid in pids} == {pid: [] for pid in pids}
    finally:
        r.kill()


def test_the_supervisor_starts_its_workers_without_torch(tmp_path, proxy_bundle):
    # the supervisor reads the config and starts the workers without the pipeline's modules: torch
    # (~300 MiB of the process's own memory, ~1.4 s) is in the workers only (proxy/serve.py)
    r = Replica(tmp_path, proxy_bundle, stages=[], plain=True)
    try:
        workers = [int(f.stem.split("_")[-1]) for f in r.mpdir.glob("*.db")]
        assert workers and all("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in workers)
        assert "libtorch" not in Path(f"/proc/{r.proc.pid}/maps").read_text()
    finally:
        r.kill()


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path, proxy_bundle):
    r = Replica(tmp_path, proxy_bundle, stages=[])
    try:
        infer(r.url, np.zeros((1, 1, 28, 28), np.float32))
        pids = [int(f.stem.split("_")[-1]) for f in r.mpdir.glob("counter_*.db")]
        assert len(pids) == WORKERS
        r.proc.kill()  # SIGKILL: no drain, no forwarding
        r.proc.wait()
        deadline = time.monotonic() + 60
        while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")], "a worker outlived its supervisor"
    finally:
        r.kill()


def attempt(url: str, x: np.ndarray) -> tuple[str, np.ndarray | None]:
    """(status, logits) of one request on a connection of its own."""
    try:
        return "OK", infer(url, x)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode."), None


def test_a_flood_on_two_workers_is_served_or_refused_and_nothing_is_lost(tmp_path, proxy_bundle, ort_logits):
    queue = 3  # per worker
    r = Replica(tmp_path, proxy_bundle, stages=[{"name": "slow", "kind": "test_proxy_sleep", "params": {"seconds": 0.2}}],
                batching={"enabled": True, "max_batch_size": 1, "max_queue_items": queue, "workers": 1},
                limits={"max_batch_items": 1})
    try:
        rng = np.random.default_rng(0)
        flood = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(40)]  # distinct images
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda x: attempt(r.url, x), flood))
        statuses = collections.Counter(s for s, _ in answers)
        assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses  # each answered: served or refused at once
        assert statuses["RESOURCE_EXHAUSTED"] > 0 and statuses["OK"] >= WORKERS, statuses
        for x, (status, logits) in zip(flood, answers):
            if status == "OK":  # every served answer is its own request's
                np.testing.assert_allclose(logits, ort_logits(x), rtol=1e-5, atol=1e-6)
        served = r.per_worker("robustgate_requests_total", {"outcome": "accepted"})
        refused = counter(r.metrics_port, "robustgate_requests_total", outcome="resource_exhausted")
        assert sum(served.values()) == statuses["OK"] and refused == statuses["RESOURCE_EXHAUSTED"]
        # the load dropped: every new request is served
        later = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(6)]
        for x in later:
            np.testing.assert_allclose(infer(r.url, x), ort_logits(x), rtol=1e-5, atol=1e-6)
        code, _ = r.stop()
        assert code == 0
    finally:
        r.kill()


def test_a_stateful_history_is_one_across_workers(tmp_path, proxy_bundle):
    """The supervisor's store service (defenses/stateful/remote.py): a client whose queries arrive on
    many connections, spread over both workers by the kernel, has one history and one block. The
    attack stream stops at its first refusal, when one worker has seen the detection; a block kept
    per worker would then let about half of the next calls through, on the other worker."""
    stage = {"name": "sd", "kind": "stateful", "action": "block", "threshold": 10.0, "block_after": 1,
             "cooldown_s": 600.0, "store": SMALL_STORE}
    r = Replica(tmp_path, proxy_bundle, stages=[stage])

    def ask(x: np.ndarray, client: str) -> str:
        c = tc.InferenceServerClient(r.url, channel_args=[("grpc.use_local_subchannel_pool", 1)])  # a new connection
        try:
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            c.infer("tiny", [inp], headers={"x-client-id": client})
            return "OK"
        except InferenceServerException as exc:
            return str(exc.status()).removeprefix("StatusCode.")
        finally:
            c.close()

    try:
        answers = []
        for x in attack_stream(fmnist_images(1)[0], 30, seed=3):
            answers.append(ask(x[None], "mallory"))
            if answers[-1] != "OK":
                break
        assert answers[0] == "OK" and answers[-1] == "RESOURCE_EXHAUSTED", answers
        fresh = fmnist_images(32, offset=700)
        assert [ask(x[None], "mallory") for x in fresh[:16]] == ["RESOURCE_EXHAUSTED"] * 16  # blocked on both
        assert [ask(x[None], "alice") for x in fresh[16:]] == ["OK"] * 16  # another client is not
        blocked = r.per_worker("robustgate_requests_total", {"outcome": "blocked"})
        assert len(blocked) == WORKERS and sum(blocked.values()) == 17, blocked  # each worker refused mallory
        assert counter(r.metrics_port, "robustgate_clients_blocked_total", reason="sd") == 1
        want, entries = len(answers) + 16, None  # every observed query of both clients (blocked ones are not)
        for _ in range(100):  # the workers write the store gauges once a second
            entries = scrape(r.metrics_port).get("robustgate_stateful_entries", {}).get(frozenset({("stage", "sd")}))
            if entries == want:
                break
            time.sleep(0.1)
        assert entries == want
        code, rest = r.stop()
        assert code == 0, rest
    finally:
        r.kill()
