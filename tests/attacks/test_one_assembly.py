"""``robustgate eval`` and the proxy build their pipelines through one assembly
(defenses/assemble.py), eval works on a bundle of any (C, H, W) and on a bundle without a torch twin
(gradient-free attacks, transfer from a surrogate, every skipped attack named in both reports)."""

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

import robustgate
from robustgate.attacks.runner import EvalSettings, Evaluation, load_pipelines
from robustgate.defenses import assemble
from robustgate.defenses import base as defenses_base

PACKAGE = Path(robustgate.__file__).parent


def test_nothing_outside_the_assembly_builds_stages():
    """No module of attacks/ or proxy/ reaches for the stage builders the assembly wraps
    (``build_from_bundle``, the registry's ``build``) or puts a DefendedModel together itself."""
    offenders = []
    for folder in ("attacks", "proxy"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module in ("robustgate.defenses.base",
                                                                        "robustgate.defenses.pipeline"):
                    bad = {a.name for a in node.names} & {"build_from_bundle", "build", "DefendedModel"}
                    offenders += [f"{path.relative_to(PACKAGE)} imports {b}" for b in sorted(bad)]
                if isinstance(node, ast.Attribute) and node.attr in ("build_from_bundle", "DefendedModel"):
                    offenders.append(f"{path.relative_to(PACKAGE)} uses .{node.attr}")
    assert not offenders, offenders


def test_eval_and_the_proxy_both_build_through_the_assembly(tiny, tiny_bundle, backbone, monkeypatch, tmp_path,
                                                           hf_threshold):
    """Every stage eval serves or attacks, and every stage the proxy serves, is built by the
    assembly's build_stages (its ``where`` names it); the registry's builder refuses anyone else."""
    from robustgate.defenses.assemble import PipelineRunner
    from robustgate.proxy.backends.onnx import OnnxBackend
    from robustgate.proxy.config import load_config
    from robustgate.proxy.serve import build_server

    built = []
    original = assemble.build_from_bundle

    def spy(kind, name, params, threshold, bundle, *, where, runtime=None):
        built.append((name, runtime))
        return original(kind, name, params, threshold, bundle, where=where, runtime=runtime)

    def refuse(*args, **kwargs):
        raise AssertionError("a stage was built outside defenses/assemble.py")

    monkeypatch.setattr(assemble, "build_from_bundle", spy)
    monkeypatch.setattr(defenses_base, "build_from_bundle", refuse)
    stages = [{"name": "hf", "kind": "attacks_test_hf", "threshold": hf_threshold},
              {"name": "bits", "kind": "bitdepth", "params": {"bits": 4}}]
    pipeline = tmp_path / "proxy.yaml"
    pipeline.write_text(yaml.safe_dump({"pipeline": {"stages": stages}}))

    evaluation = Evaluation(tiny, load_pipelines(pipeline), EvalSettings(attacks=["fgsm"], eps=[0.1], n=4), tmp_path / "r",
                            backbone=backbone, progress=False, surface_points=0)
    served, twin = evaluation.built["proxy"]
    assert isinstance(served, PipelineRunner) and isinstance(served.backend, OnnxBackend)
    assert built == [("hf", "served"), ("bits", "served"), ("hf", "torch"), ("bits", "torch")]  # served, then the twin
    assert [s.name for s in twin.stages] == [s.name for s in served.stages]

    built.clear()
    cfg = load_config(None, environ={}, overrides={"bundle": str(tiny_bundle), "pipeline": {"stages": stages},
                                                   "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None}})
    server = build_server(cfg)
    assert built == [("hf", "served"), ("bits", "served")]
    assert type(server.runner) is type(served)


def _without_twin(bundle_dir: Path, out: Path) -> Path:
    """A copy of the bundle whose backbone.weights entry is removed: no torch twin."""
    import shutil

    shutil.copytree(bundle_dir, out)
    manifest = yaml.safe_load((out / "bundle.yaml").read_text())
    weights = manifest["backbone"].pop("weights")
    (out / weights["path"]).unlink()
    (out / "bundle.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return out


def test_a_bundle_without_a_twin_runs_only_gradient_free_attacks_and_says_so(tiny_bundle, tmp_path, capsys):
    from robustgate.models.bundle import Bundle
    from robustgate.models.twin import has_twin
    from robustgate.proxy.cli import main

    bare = _without_twin(tiny_bundle, tmp_path / "bare")
    assert not has_twin(Bundle.load(bare))
    pipeline = tmp_path / "bits.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"kind": "bitdepth", "params": {"bits": 4}}]}))
    common = ["eval", "--bundle", str(bare), "--pipeline", str(pipeline), "--attacks", "fgsm,pgd,bpda,square",
              "--eps", "0.1", "--n", "8", "--steps", "2", "--queries", "5", "--no-progress"]

    assert main([*common, "--out", str(tmp_path / "alone")]) == 0
    data = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert set(data["skipped_attacks"]) == {"fgsm", "pgd", "bpda"}
    assert all("no torch twin" in r and "--surrogate" in r for r in data["skipped_attacks"].values())
    status = {(c["config"], c["attack"]): c["status"] for c in data["cells"]}
    assert status[("bits", "square")] == status[("none", "square")] == "done"
    assert {s for (_, a), s in status.items() if a != "square"} == {"skipped"}
    assert not data.get("loss_surfaces")  # a loss surface needs a twin: none drawn
    md = (tmp_path / "alone" / "results.md").read_text()
    assert "Skipped attacks" in md and all(f"`{a}`" in md for a in ("fgsm", "pgd", "bpda"))
    assert "SKIPPED fgsm" in capsys.readouterr().out

    # transfer: the backbone attacks crafted on the surrogate's twin, scored on this bundle's pipeline
    assert main([*common, "--surrogate", str(tiny_bundle), "--out", str(tmp_path / "transfer")]) == 0
    data = json.loads((tmp_path / "transfer" / "results.json").read_text())
    assert data["transfer_from"]["name"] == "tiny"
    assert set(data["skipped_attacks"]) == {"bpda"} and "backbone attacks only" in data["skipped_attacks"]["bpda"]
    cells = {(c["config"], c["attack"]): c for c in data["cells"]}
    for attack in ("fgsm", "pgd"):
        assert cells[("none", attack)]["status"] == "done"
        assert cells[("none", attack)]["threat_model"]["transfer_from"] == "tiny"
    # the same weights: transferred PGD breaks the (identical) served model as the white-box one would
    assert cells[("none", "pgd")]["metrics"]["robust_accuracy"] < data["configs"]["none"]["clean"]["clean_accuracy"]
    assert "Transfer" in (tmp_path / "transfer" / "results.md").read_text()


def test_eval_works_on_an_rgb_bundle_of_another_size(tmp_path):
    """A 3x32x32 bundle: eval reads its data conformed to the input (models.data.bundle_splits) and
    attacks it; the served runner and the twin agree on what they classify."""
    from robustgate.models.archs import build_arch
    from robustgate.models.export import write_bundle

    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "image_size": 32, "width": 4, "hidden": 16,
              "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    model = build_arch("cnn", **kwargs).eval()
    classes = [str(i) for i in range(10)]
    bundle = write_bundle(tmp_path / "rgb", model, arch="cnn", arch_kwargs=kwargs, classes=classes,
                          input_shape=(3, 32, 32), name="rgb", features=True, seed=0,
                          probe=torch.rand(4, 3, 32, 32))
    configs = [c for c in load_pipelines(None)]
    evaluation = Evaluation(bundle, configs, EvalSettings(attacks=["fgsm"], eps=[0.1], n=6), tmp_path / "r",
                            progress=False, surface_points=1)
    assert tuple(evaluation.x.shape) == (6, 3, 32, 32)
    result = evaluation.run()
    assert result["cells"][0]["status"] == "done"
    with torch.no_grad():
        twin_pred = evaluation.built["none"][1](evaluation.x).argmax(1)
    assert result["configs"]["none"]["clean"]["backbone_clean_accuracy"] == pytest.approx(
        float((twin_pred == evaluation.y).float().mean()))


def test_eval_and_probe_show_their_defaults_and_the_data_flags(capsys):
    import argparse

    from robustgate.attacks import cli, probe
    from robustgate.proxy.cli import main

    for command in ("eval", "probe"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--dataset {fashion-mnist,mnist,cifar10,imagefolder}" in text and "--data-dir" in text
        assert "(default: 0)" in text  # --offset: ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser()
    probe.add_arguments(p)
    assert p.parse_args(["--url", "u", "--model", "old"]).model_name == "old"  # the old flag, hidden
    assert p.parse_args(["--url", "u", "--model-name", "new"]).model_name == "new"
    assert "--model " not in p.format_help() and "--model-name" in p.format_help()
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--bundle", "b", "--out", "o"])
    assert args.device == "cpu" and args.surrogate is None and args.dataset is None
    assert "--device {cpu,cuda,auto}" in " ".join(p.format_help().split())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_eval_generates_attacks_on_cuda(tiny, tmp_path, hf_threshold):
    configs = load_pipelines(None)
    settings = EvalSettings(attacks=["pgd", "bpda"], eps=[0.1], n=8, steps=3, device="cuda")
    evaluation = Evaluation(tiny, configs, settings, tmp_path / "cuda", progress=False, surface_points=1)
    assert next(evaluation.backbone.parameters()).device.type == "cuda"
    result = evaluation.run()
    assert {c["attack"]: c["status"] for c in result["cells"]} == {"pgd": "done", "bpda": "done"}
    assert result["loss_surfaces"]["none"]
