"""Config validation and overrides, the `serve` command's exits, and SIGTERM drain of a real
`robustgate serve` process with requests in flight."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from robustgate.proxy.cli import main as cli_main
from robustgate.proxy.config import ConfigError, load_config
from robustgate.proxy.serve import loop_runner

HERE = Path(__file__).resolve().parent


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_with_a_bundle_only(tmp_path):
    cfg = load_config(None, environ={}, overrides={"bundle": str(tmp_path)})
    assert cfg.server.port == 8001 and cfg.server.metrics_port == 8002
    assert cfg.backend.kind == "onnxruntime" and cfg.backend.onnxruntime.device == "cpu"
    assert cfg.batching.enabled and cfg.pipeline.stages == [] and cfg.pipeline.verdict_mode == "request"


@pytest.mark.parametrize("data, key", [
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"server": {"prot": 1}}, "server.prot"),
    ({"server": {"event_loop": "trio"}}, "server.event_loop"),
    ({"backend": {"onnxruntime": {"device": "tpu"}}}, "backend.onnxruntime.device"),
    ({"pipeline": {"stages": [{"name": "a", "kind": "jpeg", "action": "drop"}]}}, "pipeline.stages.0.action"),
    ({"pipeline": {"stages": [{"name": "a b", "kind": "jpeg"}]}}, "pipeline.stages.0.name"),
    ({"pipeline": {"verdict_mode": "batch"}}, "pipeline.verdict_mode"),
    ({"server": {"tls": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"}}}, "server.tls"),
    ({"limits": {"max_batch_items": -3}}, "limits.max_batch_items"),
    ({"batching": {"max_queue_items": 8}, "limits": {"max_batch_items": 16}}, "batching.max_queue_items"),
])
def test_config_errors_name_the_key(tmp_path, data, key):
    path = write(tmp_path, {"bundle": str(tmp_path), **data})
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value) and str(path) in str(err.value)


def test_event_loop_auto_is_uvloop_where_installed_and_a_missing_uvloop_names_the_key(monkeypatch):
    import asyncio

    import uvloop

    assert loop_runner("auto") is uvloop.run and loop_runner("uvloop") is uvloop.run
    assert loop_runner("asyncio") is asyncio.run
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: importing it raises ImportError
    assert loop_runner("auto") is asyncio.run
    with pytest.raises(ConfigError, match="server.event_loop: uvloop is not installed"):
        loop_runner("uvloop")


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    path = write(tmp_path, {"bundle": str(tmp_path), "server": {"port": 7000}, "batching": {"max_batch_size": 4}})
    env = {
        "ROBUSTGATE_SERVER__PORT": "9000", "ROBUSTGATE_BATCHING__MAX_BATCH_SIZE": "32",
        "ROBUSTGATE_PIPELINE__VERDICT_MODE": "item", "ROBUSTGATE_BATCHING__ENABLED": "false",
        "ROBUSTGATE_BACKEND__UPSTREAM__URL": "upstream:8001", "OTHER_VAR": "ignored",
        "ROBUSTGATE_SKIP_APT": "1",  # scripts/install.sh's variable, not a config key: ignored
    }
    cfg = load_config(path, environ=env)
    assert cfg.server.port == 9000 and cfg.batching.max_batch_size == 32 and not cfg.batching.enabled
    assert cfg.pipeline.verdict_mode == "item" and cfg.backend.upstream.url == "upstream:8001"
    cfg = load_config(path, environ=env, overrides={"server": {"port": 9100}})
    assert cfg.server.port == 9100


def test_serving_imports_neither_diffusers_nor_scipy_unless_a_stage_needs_them():
    # diffusers costs ~2.4 s of every serving process's start-up (defenses/purify/diffusion.py), scipy.stats
    # ~0.6 s (defenses/ensemble/smoothing.py); importing the packages registers every kind
    code = ("import sys; import robustgate.proxy.serve, robustgate.proxy.server, robustgate.proxy.cli; "
            "import robustgate.defenses.purify, robustgate.defenses.ensemble, robustgate.defenses.detect; "
            "assert 'diffusers' not in sys.modules and 'scipy.stats' not in sys.modules, 'imported'; "
            "from robustgate.defenses.purify.diffusion import make_schedulers; make_schedulers(10); "
            "from robustgate.defenses.ensemble.smoothing import binomial_test_pvalue; binomial_test_pvalue([3], [1]); "
            "assert 'diffusers' in sys.modules and 'scipy.stats' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_projects_own_variables_pass_quietly_and_a_stray_name_is_warned(tmp_path, caplog):
    own = {"ROBUSTGATE_STORE_SOCKET": "/tmp/s", "ROBUSTGATE_CACHE": "/tmp/c", "ROBUSTGATE_SKIP_APT": "1",
           "ROBUSTGATE_FRONT_MAX_QUEUE": "8"}  # the workers', the data cache's, install.sh's, the front's
    with caplog.at_level(logging.WARNING, logger="robustgate.proxy"):
        load_config(None, environ={"ROBUSTGATE_BUNDLE": str(tmp_path), **own})
        assert caplog.text == ""
        load_config(None, environ={"ROBUSTGATE_BUNDLE": str(tmp_path), "ROBUSTGATE_PORT": "9000"})
    assert "ignoring environment variable ROBUSTGATE_PORT: not a configuration key" in caplog.text


@pytest.mark.parametrize("env, needles", [
    ({"ROBUSTGATE_BATCHING__MAX_BATCH_SIZE": "many"}, ["batching.max_batch_size", "ROBUSTGATE_BATCHING__MAX_BATCH_SIZE"]),
    ({"ROBUSTGATE_SERVR__PORT": "1"}, ["servr", "ROBUSTGATE_SERVR__PORT"]),
])
def test_bad_environment_names_the_variable(tmp_path, env, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"ROBUSTGATE_BUNDLE": str(tmp_path), **env})
    for needle in needles:
        assert needle in str(err.value)


def test_serve_exits_nonzero_naming_the_bad_key(tmp_path, proxy_bundle):
    path = write(tmp_path, {"bundle": str(proxy_bundle), "batching": {"max_queue_delay_ms": -1}})
    proc = subprocess.run([sys.executable, "-m", "robustgate.proxy.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "batching.max_queue_delay_ms" in proc.stderr


def test_serve_refuses_a_tampered_bundle_and_an_unknown_stage(tmp_path, proxy_bundle, capsys):
    bad = tmp_path / "bundle"
    shutil.copytree(proxy_bundle, bad)
    with open(bad / "backbone.onnx", "ab") as fh:
        fh.write(b"\0")
    assert cli_main(["serve", "--bundle", str(bad), "--port", "0", "--metrics-port", "0"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli_main(["serve", "--bundle", str(tmp_path / "missing")]) == 2
    assert "no bundle.yaml" in capsys.readouterr().err
    path = write(tmp_path, {"bundle": str(proxy_bundle), "pipeline": {"stages": [{"name": "x", "kind": "no_such_defense"}]}})
    assert cli_main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.stages.0 (x)" in err and "no_such_defense" in err


def _queue_depth(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "robustgate_queue_depth":
            return fam.samples[0].value
    raise AssertionError("no robustgate_queue_depth in /metrics")


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path, proxy_bundle, ort_logits, event_loop):
    path = write(tmp_path, {
        "bundle": str(proxy_bundle),
        "server": {"host": "127.0.0.1", "metrics_host": "127.0.0.1", "grace_s": 60},
        "batching": {"enabled": True, "max_batch_size": 64, "workers": 1},  # one batch runs at a time
        "pipeline": {"stages": [{"name": "slow", "kind": "test_proxy_sleep", "params": {"seconds": 0.4}}]},
    })
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTGATE_")}
    env["ROBUSTGATE_BATCHING__ENABLED"] = "false"  # the environment wins over the file: one request per batch
    env["ROBUSTGATE_SERVER__WORKERS"] = "1"  # one process's queue (N = 2: tests/proxy/test_workers.py)
    env["ROBUSTGATE_SERVER__EVENT_LOOP"] = event_loop  # signals, drain and answers on either loop
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "serve_with_sleep.py"), "serve", "--config", str(path), "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("robustgate: serving"):
                break
        assert any(f"event loop: {event_loop}" in line for line in lines), lines
        words = lines[-1].replace(",", "").split()
        port, metrics_port = int(words[words.index("port") + 1]), int(words[-1])
        url = f"127.0.0.1:{port}"
        xs = [np.full((1, 1, 28, 28), v, np.float32) for v in (0.1, 0.2, 0.3, 0.4)]

        def one(x):
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return tc.InferenceServerClient(url).infer("tiny", [inp]).as_numpy("logits")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, x) for x in xs]
            for _ in range(600):  # one running, three queued behind it
                if _queue_depth(metrics_port) == 3:
                    break
                time.sleep(0.02)
            assert _queue_depth(metrics_port) == 3
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(60) for f in futures]
        assert proc.wait(60) == 0
        rest = proc.stdout.read()
        assert "draining" in rest and "stopped" in rest
        for x, got in zip(xs, answers):
            np.testing.assert_allclose(got, ort_logits(x), rtol=1e-5, atol=1e-6)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_exits_nonzero_when_the_port_is_taken(proxy_bundle, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = cli_main(["serve", "--bundle", str(proxy_bundle), "--host", "127.0.0.1", "--port", str(port),
                         "--metrics-port", "0"])
    assert code == 2 and f"cannot bind the gRPC port 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_second_proxy_cannot_share_a_port(start_proxy, proxy_bundle, capsys):
    first = start_proxy()
    code = cli_main(["serve", "--bundle", str(proxy_bundle), "--host", "127.0.0.1", "--port", str(first.port),
                     "--metrics-port", "0"])
    assert code == 2 and "cannot bind" in capsys.readouterr().err
    assert tc.InferenceServerClient(first.url).is_server_ready()
