"""deploy/k8s: every manifest valid for a pinned Kubernetes, and the pieces agree with each other.

Validation uses kubernetes-validate's shipped OpenAPI schemas in strict mode (unknown fields are
errors). The Kustomize overlays are rendered with `kubectl kustomize` when kubectl is installed
(it is on the development machine); the resource files are validated one by one regardless.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from robustgate.proxy.config import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Pinned: sidecars are stable from 1.33. The manifests also hold for 1.30, the first release with
# native sidecars and the preStop sleep action on by default.
K8S_VERSION = "1.33.0"
K8S_MIN_VERSION = "1.30.0"
KUBECTL = shutil.which("kubectl")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(path: Path) -> dict:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def resource_files() -> list[Path]:
    return [BASE / r for r in kustomization(BASE)["resources"]]


def render(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def base_resources() -> list[dict]:
    return [d for path in resource_files() for d in docs(path)]


def pod_spec() -> dict:
    return by_kind(base_resources(), "Deployment")["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def proxy_config():
    return load_config(BASE / "robustgate.yaml", environ={})


@pytest.mark.parametrize("version", [K8S_VERSION, K8S_MIN_VERSION])
@pytest.mark.parametrize("path", resource_files(), ids=lambda p: p.name)
def test_resource_file_is_valid(path, version):
    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelled_field():
    deployment = copy.deepcopy(by_kind(base_resources(), "Deployment"))
    deployment["spec"]["template"]["spec"]["initContainers"][1]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_rendered_kustomization_is_valid(directory):
    rendered = render(directory)
    kinds = sorted(r["kind"] for r in rendered)
    # an overlay's own (not replacing) generators add ConfigMaps: the front's haproxy.cfg
    added = [] if directory == BASE else [
        "ConfigMap" for g in kustomization(directory).get("configMapGenerator", []) if g.get("behavior") != "replace"]
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
         "PodDisruptionBudget", "Service", "Service", "ServiceAccount", *added]
    )
    for resource in rendered:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    # The generated (hash-suffixed) ConfigMaps are the ones the pod mounts.
    maps = {r["metadata"]["name"] for r in rendered if r["kind"] == "ConfigMap"}
    volumes = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {v["configMap"]["name"] for v in volumes if "configMap" in v} == maps
    config = by_kind(rendered, "ConfigMap", next(m for m in maps if m.startswith("robustgate-config")))
    assert yaml.safe_load(config["data"]["robustgate.yaml"]) == yaml.safe_load((BASE / "robustgate.yaml").read_text())


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_gpu_overlay_gives_the_model_server_a_gpu_and_keeps_proxy_cpu_scaling():
    rendered = render(K8S / "overlays" / "gpu")
    spec = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    assert container(spec, "model-server")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(spec, "robustgate")["resources"]["limits"]
    metrics = by_kind(rendered, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["containerResource"]["container"] for m in metrics] == ["robustgate"]
    pbtxt = by_kind(rendered, "ConfigMap", next(
        r["metadata"]["name"] for r in rendered if r["metadata"]["name"].startswith("triton-model-config")
    ))["data"]["config.pbtxt"]
    assert "KIND_GPU" in pbtxt


def test_kustomization_references_exist():
    """What `kubectl kustomize` would check, for machines without kubectl."""
    for directory in [BASE, *OVERLAYS]:
        k = kustomization(directory)
        for ref in k.get("resources", []):
            assert (directory / ref).exists(), f"{directory.name}: resource {ref} missing"
        for gen in k.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (directory / f).is_file(), f"{directory.name}: generator file {f} missing"
            if gen.get("behavior") == "replace":
                assert gen["name"] in {g["name"] for g in kustomization(BASE)["configMapGenerator"]}
        for patch in k.get("patches", []):
            if "path" in patch:
                for doc in docs(directory / patch["path"]):
                    by_kind(base_resources(), doc["kind"], doc["metadata"]["name"])
            else:
                by_kind(base_resources(), patch["target"]["kind"], patch["target"]["name"])


def test_proxy_is_a_native_sidecar_of_the_model_server():
    spec = pod_spec()
    init = {c["name"]: c for c in spec["initContainers"]}
    assert init["robustgate"]["restartPolicy"] == "Always"
    assert "restartPolicy" not in init["seed-model-repository"], "the seed step runs to completion first"
    assert list(init) == ["seed-model-repository", "robustgate"]
    assert [c["name"] for c in spec["containers"]] == ["model-server"]
    assert container(spec, "model-server")["image"].startswith("nvcr.io/nvidia/tritonserver")


def test_proxy_forwards_to_the_loopback_only_model_server():
    cfg = proxy_config()
    assert cfg.backend.kind == "upstream"
    host, _, port = cfg.backend.upstream.url.rpartition(":")
    assert host == "127.0.0.1"
    args = container(pod_spec(), "model-server")["args"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--"))
    assert flags["grpc-address"] == "127.0.0.1"
    assert flags["grpc-port"] == port
    assert flags["allow-http"] == "false" and flags["allow-metrics"] == "false"
    assert int(port) not in (cfg.server.port, cfg.server.metrics_port)


def test_model_name_and_batch_limit_agree_between_proxy_seed_and_triton():
    cfg = proxy_config()
    env = env_of(container(pod_spec(), "seed-model-repository"))
    directories = [BASE, *OVERLAYS]
    for directory in directories:
        pbtxt_path = directory / "config.pbtxt"
        if not pbtxt_path.exists():
            continue
        pbtxt = pbtxt_path.read_text()
        assert re.search(r'^name: "(\w+)"', pbtxt, re.M).group(1) == env["MODEL_NAME"] == cfg.backend.upstream.model_name
        max_batch = int(re.search(r"^max_batch_size: (\d+)", pbtxt, re.M).group(1))
        # No ensemble stage in the shipped pipeline, so one upstream call carries at most one request.
        assert max_batch >= cfg.limits.max_batch_items
    assert env["BUNDLE"] == str(cfg.bundle)


def test_probes_ports_and_service_point_at_the_proxy_only():
    cfg = proxy_config()
    spec = pod_spec()
    proxy = container(spec, "robustgate")
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"grpc": cfg.server.port, "metrics": cfg.server.metrics_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert proxy[probe]["grpc"]["port"] == cfg.server.port
    assert "ports" not in container(spec, "model-server")
    for svc in (r for r in base_resources() if r["kind"] == "Service"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{svc['metadata']['name']} exposes {port['targetPort']}"
    pod_labels = by_kind(base_resources(), "Deployment")["spec"]["template"]["metadata"]["labels"]
    for svc in (r for r in base_resources() if r["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_network_policy_opens_only_the_proxy_ports_and_denies_egress():
    cfg = proxy_config()
    policy = by_kind(base_resources(), "NetworkPolicy")["spec"]
    pod_labels = by_kind(base_resources(), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert opened == {cfg.server.port, cfg.server.metrics_port}
    assert all(rule.get("ports") for rule in policy["ingress"]), "a rule without ports opens every port"
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []


def test_every_container_has_requests_and_limits_and_runs_unprivileged():
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["initContainers"] + spec["containers"]:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']} {kind}"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_pdb_and_hpa_target_this_deployment():
    resources = base_resources()
    deployment = by_kind(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = by_kind(resources, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = by_kind(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2, "with maxUnavailable 1, one replica left serving during a drain"
    names = {c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]} | {
        c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    for metric in hpa["metrics"]:
        assert metric["containerResource"]["container"] in names


def test_termination_order_lets_the_proxy_drain_before_the_model_stops():
    cfg = proxy_config()
    spec = pod_spec()
    sleep = container(spec, "model-server")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep > cfg.server.grace_s, "Triton must outlive the proxy's drain (it stops first)"
    assert spec["terminationGracePeriodSeconds"] > sleep + 10


def test_seed_init_container_copies_the_bundle_backbone(tiny_bundle, tmp_path):
    from robustgate.models.bundle import Bundle

    seed = container(pod_spec(), "seed-model-repository")
    env = env_of(seed)
    env.update(BUNDLE=str(tiny_bundle), MODEL_REPOSITORY=str(tmp_path / "models"), TRITON_CONFIG=str(BASE / "config.pbtxt"))
    assert seed["command"] == ["python", "-c"]
    proc = subprocess.run([sys.executable, "-c", *seed["args"]], env={**os.environ, **env},
                          capture_output=True, text=True, check=True)
    assert "seeded" in proc.stdout
    version = tmp_path / "models" / env["MODEL_NAME"] / "1"
    bundle = Bundle.load(tiny_bundle)
    assert hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest() == bundle.spec.backbone.onnx.sha256
    assert (version.parent / "config.pbtxt").read_text() == (BASE / "config.pbtxt").read_text()


def test_shipped_pipeline_builds_against_a_bundle_fitted_as_documented(magnet_bundle):
    """The ConfigMap's stages load from a bundle fitted with `robustgate fit --defense magnet
    --name magnet`: names and kinds match, every detector gets its calibrated threshold."""
    from robustgate.defenses.base import Detector
    from robustgate.models.bundle import Bundle
    from robustgate.defenses.assemble import build_stages

    bundle = Bundle.load(magnet_bundle)
    stages = build_stages(proxy_config().pipeline, bundle)
    assert [s.name for s in stages] == [s.name for s in proxy_config().pipeline.stages]
    for stage in stages:
        assert stage.name in bundle.spec.defenses, f"stage {stage.name} is not fitted in the bundle"
        if isinstance(stage.defense, Detector):
            assert stage.defense.threshold == bundle.defense(stage.name).threshold



DEFAULT_BUNDLE = ROOT / "bundles" / "default"


def _default_bundle_has_defenses() -> bool:
    spec = yaml.safe_load((DEFAULT_BUNDLE / "bundle.yaml").read_text()) if (DEFAULT_BUNDLE / "bundle.yaml").is_file() else {}
    return bool(spec.get("defenses"))


@pytest.mark.skipif(not _default_bundle_has_defenses(),
                    reason="bundles/default holds no fitted defense yet; the k8s pipeline needs its detector stages fitted")
def test_shipped_pipeline_stages_are_fitted_in_the_default_bundle():
    from robustgate.models.bundle import Bundle

    bundle = Bundle.load(DEFAULT_BUNDLE)
    for stage in proxy_config().pipeline.stages:
        assert stage.name in bundle.spec.defenses, f"bundles/default has no fitted {stage.name!r} for the k8s pipeline"
        assert bundle.defense(stage.name).kind == stage.kind


# --- overlays/front: the native front (deploy/haproxy) as a third container of the pod --------

FRONT = K8S / "overlays" / "front"
FRONT_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def test_front_overlay_ships_the_tested_haproxy_config():
    """kustomize reads no file outside the overlay, so it holds a copy of the file that
    tests/hardening/test_front.py runs a real HAProxy with: the two must not drift."""
    assert (FRONT / "haproxy.cfg").read_text() == FRONT_CFG.read_text(), (
        "deploy/k8s/overlays/front/haproxy.cfg differs from deploy/haproxy/haproxy.cfg: copy it over")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_front_overlay_puts_haproxy_between_the_service_and_a_loopback_proxy():
    rendered = render(FRONT)
    spec = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["seed-model-repository", "robustgate", "front"], (
        "the seed step first; the front after robustgate, so it stops first")
    proxy, front = container(spec, "robustgate"), container(spec, "front")
    assert front["restartPolicy"] == "Always" and front["image"].startswith("haproxy:")
    # robustgate with the overlay's environment: on loopback, where only the front reaches it
    cfg = load_config(BASE / "robustgate.yaml", environ=env_of(proxy))
    assert cfg.server.host == "127.0.0.1"
    fenv = env_of(front)
    needed = set(re.findall(r"\$\{(ROBUSTGATE_FRONT_\w+)\}", FRONT_CFG.read_text()))
    assert needed and needed <= fenv.keys(), f"the front's environment lacks {needed - fenv.keys()}"
    assert fenv["ROBUSTGATE_FRONT_UPSTREAM"] == f"127.0.0.1:{cfg.server.port}"
    front_ports = {p["name"]: p["containerPort"] for p in front["ports"]}
    proxy_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert front_ports["grpc"] == int(fenv["ROBUSTGATE_FRONT_BIND"].rpartition(":")[2]) == 8001
    assert front_ports["front-metrics"] == int(fenv["ROBUSTGATE_FRONT_METRICS_BIND"].rpartition(":")[2])
    assert proxy_ports == {"metrics": cfg.server.metrics_port}, "robustgate's gRPC port belongs to the front now"
    # the Services' `grpc` target is the front; the probes reach robustgate's health service through it
    for svc in (r for r in rendered if r["kind"] == "Service"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in front_ports.keys() | proxy_ports.keys()
    for probe in ("livenessProbe", "readinessProbe"):
        assert proxy[probe]["grpc"]["port"] == front_ports["grpc"]
    assert front["livenessProbe"]["httpGet"]["port"] == front_ports["front-metrics"]
    mount = next(m for m in front["volumeMounts"] if m["name"] == "robustgate-front")
    assert front["args"] == ["haproxy", "-f", f"{mount['mountPath']}/haproxy.cfg"]
    # the front's exporter is open to the monitoring namespace only, like robustgate's metrics
    policy = by_kind(rendered, "NetworkPolicy")["spec"]
    opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert opened == {front_ports["grpc"], cfg.server.metrics_port, front_ports["front-metrics"]}
    monitoring = next(r for r in policy["ingress"] if "from" in r)
    assert {p["port"] for p in monitoring["ports"]} == {cfg.server.metrics_port, front_ports["front-metrics"]}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(front["resources"][kind])
    assert front["securityContext"]["allowPrivilegeEscalation"] is False
