"""`robustgate eval`: the matrix runs on the served path, reports are written and parse, and an
interrupted run resumes from its cached cells."""

import json

import pytest
import yaml

from robustgate.attacks import suite
from robustgate.attacks.reports import write_reports
from robustgate.attacks.runner import EvalSettings, Evaluation, NamedPipeline, load_pipelines


@pytest.fixture()
def pipeline_file(tmp_path, hf_threshold):
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"configs": {
        "jpeg": {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 60}}]},
        "guarded": {"stages": [
            {"name": "hf", "kind": "attacks_test_hf", "action": "reject", "threshold": hf_threshold},
            {"name": "noise", "kind": "noise", "params": {"sigma": 0.05}},
        ]},
    }}, sort_keys=False))
    return path


def test_eval_writes_reports_and_resumes(tiny, backbone, pipeline_file, tmp_path, monkeypatch):
    configs = load_pipelines(pipeline_file)
    assert [c.name for c in configs] == ["none", "jpeg", "guarded"]
    settings = EvalSettings(attacks=["fgsm", "pgd", "bpda", "eot", "joint", "square"], eps=[0.1, 0.3], n=16,
                            steps=4, eot=2, queries=10)
    out = tmp_path / "report"
    result = Evaluation(tiny, configs, settings, out, backbone=backbone, progress=False).run()
    result["command"] = "test"
    paths = write_reports(result, out)

    data = json.loads(paths["json"].read_text())
    assert data["schema_version"] == 1 and data["n"] == 16
    assert set(data["configs"]) == {"none", "jpeg", "guarded"}
    cells = {(c["config"], c["attack"], c["eps"]): c for c in data["cells"]}
    assert len(cells) == 3 * 6 * 2
    for c in cells.values():
        assert c["threat_model"]["eps"] == c["eps"] and c["threat_model"]["n"] == 16
        if c["status"] == "done":
            m = c["metrics"]
            assert 0 <= m["robust_accuracy"] <= 1 and 0 <= m["attack_success_rate"] <= 1
            assert c["wall_seconds"] >= 0
    # EOT only where something is random; joint only where a detector is
    assert cells[("none", "eot", 0.1)]["status"] == "skipped"
    assert cells[("guarded", "eot", 0.1)]["status"] == "done"
    assert cells[("guarded", "eot", 0.1)]["threat_model"]["eot"] == 2
    assert cells[("guarded", "eot", 0.1)]["threat_model"]["twin_precision"] == "float32"  # attacks on the twin
    assert "twin_precision" not in cells[("guarded", "pgd", 0.1)]["threat_model"]  # on the backbone: float32 always
    assert cells[("jpeg", "joint", 0.3)]["status"] == "skipped"
    det = cells[("guarded", "joint", 0.1)]["detectors"]["hf"]
    assert 0 <= det["auc"] <= 1 and 0 <= det["tpr_at_threshold"] <= 1
    # a standard-trained model at eps 0.3: PGD leaves almost nothing undefended
    assert cells[("none", "pgd", 0.3)]["metrics"]["robust_accuracy"] <= 0.1
    assert 0.5 <= data["configs"]["none"]["clean"]["clean_accuracy"] <= 1.0
    assert {r["check"] for r in data["sanity"]} >= {"large_eps", "blackbox_vs_whitebox", "adaptive_vs_pgd"}
    md = paths["md"].read_text()
    assert "| attack | threat model | none | jpeg | guarded |" in md and "Sanity checks" in md
    for plot in data["plots"]:
        assert (out / plot).stat().st_size > 1000
    assert "loss_surfaces.png" in data["plots"] and "roc.png" in data["plots"]

    # resume: every cell comes from the cache, no attack runs again
    def boom(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    for name, a in list(suite.ATTACKS.items()):
        monkeypatch.setitem(suite.ATTACKS, name, suite.AttackDef(a.name, a.norm, a.target, a.adaptive, boom, a.fixed_steps))
    again = Evaluation(tiny, configs, settings, out, backbone=backbone, progress=False, surface_points=0).run()
    assert [(c["config"], c["attack"], c["eps"], c.get("metrics")) for c in again["cells"]] == \
        [(c["config"], c["attack"], c["eps"], c.get("metrics")) for c in result["cells"]]
    # a dropped cell is scored again from its cached examples (no attack runs); with its examples
    # dropped too, only that cell is recomputed (and it runs the attack)
    (out / "cells" / "jpeg__bpda__eps0.1.json").unlink()
    rescored = Evaluation(tiny, configs, settings, out, backbone=backbone, progress=False, surface_points=0).run()
    assert [c.get("metrics") for c in rescored["cells"]] == [c.get("metrics") for c in result["cells"]]
    (out / "cells" / "jpeg__bpda__eps0.1.json").unlink()
    for part in (out / "adv").glob("jpeg__bpda__eps0.1__*/*.safetensors"):
        part.unlink()
    with pytest.raises(AssertionError, match="recomputed"):
        Evaluation(tiny, configs, settings, out, backbone=backbone, progress=False, surface_points=0).run()
    # a cached cell is never reused for different inputs: same config name, other stage params
    guarded = configs[2].pipeline.model_copy(deep=True)
    guarded.stages[1].params["sigma"] = 0.06
    changed = [configs[0], NamedPipeline("guarded", guarded)]
    with pytest.raises(AssertionError, match="recomputed"):
        Evaluation(tiny, changed, settings, out, backbone=backbone, progress=False, surface_points=0).run()


def test_cli_eval(tiny_bundle, tmp_path, capsys):
    from robustgate.proxy.cli import main

    pipeline = tmp_path / "proxy.yaml"
    pipeline.write_text(yaml.safe_dump({"pipeline": {"stages": [{"name": "bits", "kind": "bitdepth", "params": {"bits": 3}}]}}))
    out = tmp_path / "cli"
    rc = main(["eval", "--bundle", str(tiny_bundle), "--pipeline", str(pipeline), "--attacks", "pgd,bpda",
               "--eps", "0.05,0.3", "--n", "16", "--steps", "5", "--out", str(out), "--no-progress",
               "--surface-points", "1"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["configs"]) == {"none", "proxy"}
    assert len(data["cells"]) == 2 * 2 * 2
    assert "wrote" in capsys.readouterr().out


def test_cli_eval_refuses_a_configuration_it_cannot_build_before_any_cell(tiny_bundle, tmp_path, capsys):
    from robustgate.proxy.cli import main

    pipeline = tmp_path / "configs.yaml"
    pipeline.write_text(yaml.safe_dump({"configs": {
        "bits": {"stages": [{"name": "bits", "kind": "bitdepth", "params": {"bits": 3}}]},
        "svm": {"stages": [{"name": "svm", "kind": "safetynet", "action": "reject"}]}}}))  # not fitted in the bundle
    out = tmp_path / "refused"
    rc = main(["eval", "--bundle", str(tiny_bundle), "--pipeline", str(pipeline), "--attacks", "pgd", "--eps", "0.1",
               "--n", "8", "--steps", "2", "--out", str(out), "--no-progress", "--surface-points", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "robustgate eval: pipeline.stages.0 (svm): 'safetynet' runs a fitted model" in err
    assert not (out / "cells").exists() or not any((out / "cells").iterdir())  # nothing ran
    assert main(["eval", "--bundle", str(tmp_path / "nowhere"), "--n", "8", "--out", str(out), "--no-progress"]) == 2
    assert "robustgate eval:" in capsys.readouterr().err


def test_bad_pipeline_files_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stuff": 1}))
    with pytest.raises(ValueError, match="expected 'configs', 'pipeline' or 'stages'"):
        load_pipelines(bad)
    # validated by the proxy's own PipelineConfig: the error names the bad key
    bad.write_text(yaml.safe_dump({"stages": [{"name": "x"}]}))
    with pytest.raises(ValueError, match=r"stages\.0\.kind: Field required"):
        load_pipelines(bad)
    bad.write_text(yaml.safe_dump({"configs": {"j": {"stages": [{"kind": "jpeg", "acton": "flag"}]}}}))
    with pytest.raises(ValueError, match=r"configs\.j\.stages\.0\.acton: Extra inputs are not permitted"):
        load_pipelines(bad)
    bad.write_text(yaml.safe_dump({"pipeline": {"failure_policy": "maybe", "stages": []}}))
    with pytest.raises(ValueError, match=r"pipeline\.failure_policy: Input should be 'fail-closed' or 'fail-open'"):
        load_pipelines(bad)
    with pytest.raises(ValueError, match="unknown attacks"):
        EvalSettings(attacks=["nope"], eps=[0.1])


def test_smoothing_reports_certified_accuracy(tiny, backbone, tmp_path):
    from robustgate.defenses.assemble import PipelineConfig

    configs = [NamedPipeline("smooth", PipelineConfig(stages=[{"name": "smooth", "kind": "smoothing",
                                                               "params": {"sigma": 0.25, "n0": 8, "n": 32, "alpha": 0.01}}]))]
    settings = EvalSettings(attacks=["pgd", "eot"], eps=[0.1], n=12, steps=3, eot=2, radii=[0.0, 0.25, 0.5])
    result = Evaluation(tiny, configs, settings, tmp_path / "s", backbone=backbone, progress=False,
                        surface_points=1).run()
    result["command"] = "test"
    write_reports(result, tmp_path / "s")
    cert = result["configs"]["smooth"]["clean"]["certified_accuracy"]
    values = [cert["0"], cert["0.25"], cert["0.5"]]
    assert values == sorted(values, reverse=True) and values[0] > 0
    assert values[0] <= result["configs"]["smooth"]["clean"]["clean_accuracy"] + 1e-9
    eot = next(c for c in result["cells"] if c["attack"] == "eot")
    assert eot["status"] == "done" and eot["threat_model"]["eot"] == 2
    assert "Certified accuracy" in (tmp_path / "s" / "results.md").read_text()


def test_parallel_workers_fill_the_same_cells_as_one_process(tiny_bundle, tmp_path):
    """``--parallel 2``: two worker processes compute the cells, the parent assembles them; every
    cell matches the one-process run (attacks are seeded per cell, so order does not matter), and
    a second parallel run finds everything cached. Batches of 5: every cell's examples are cached
    in three parts, generated by the workers side by side (a backbone attack's once for all
    configurations)."""
    from robustgate.proxy.cli import main

    pipeline = tmp_path / "configs.yaml"
    pipeline.write_text(yaml.safe_dump({"configs": {
        "bits": {"stages": [{"name": "bits", "kind": "bitdepth", "params": {"bits": 3}}]},
        "jpeg": {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 60}}]}}}))
    common = ["eval", "--bundle", str(tiny_bundle), "--pipeline", str(pipeline), "--attacks", "fgsm,pgd,bpda,square",
              "--eps", "0.1,0.3", "--n", "12", "--steps", "3", "--queries", "8", "--no-progress", "--surface-points", "0",
              "--batch-size", "5"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--parallel", "2", "--out", str(tmp_path / "two")]) == 0

    def cells(name):
        data = json.loads((tmp_path / name / "results.json").read_text())
        return {(c["config"], c["attack"], c["eps"]): (c["status"], c.get("metrics", {}).get("robust_accuracy"))
                for c in data["cells"]}

    one, two = cells("one"), cells("two")
    assert len(one) == 3 * 4 * 2 and one == two
    parts = {f.relative_to(tmp_path / "two" / "adv").as_posix() for f in (tmp_path / "two" / "adv").rglob("*") if f.is_file()}
    assert len(parts) == (2 * 2 + 2 * 2 * 3) * 3 and {p.rsplit("/", 1)[1] for p in parts} == {"0.safetensors", "5.safetensors", "10.safetensors"}
    assert parts == {f.relative_to(tmp_path / "one" / "adv").as_posix() for f in (tmp_path / "one" / "adv").rglob("*") if f.is_file()}
    stored = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "two" / "cells").iterdir()}
    assert not [f for f in (tmp_path / "two" / "cells").iterdir() if f.name.endswith(".tmp")]
    assert main([*common, "--parallel", "2", "--out", str(tmp_path / "two")]) == 0
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "two" / "cells").iterdir()} == stored  # all reused
    assert main([*common, "--parallel", "0", "--out", str(tmp_path / "bad")]) == 2


def test_a_stateful_stage_is_not_run_by_the_white_box_attacks_and_the_report_says_so(tiny, backbone, tmp_path):
    """deploy/default.yaml serves a stateful stage: an evaluation of such a pipeline runs, the stage acts on
    no query (the attacks send no client's stream; defenses/pipeline.py skips it without identities), so
    the pipeline scores as its other stages do, and the report names the stage as not run."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"configs": {
        "jpeg": {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 60}}]},
        "jpeg+stream": {"stages": [{"name": "jpeg", "kind": "jpeg", "params": {"quality": 60}},
                                   {"name": "bl", "kind": "stateful", "action": "block", "threshold": 10}]}}}))
    settings = EvalSettings(attacks=["fgsm", "pgd", "bpda", "square"], eps=[0.1], n=8, steps=3, queries=10)
    result = Evaluation(tiny, load_pipelines(path), settings, tmp_path / "r", backbone=backbone, progress=False,
                        surface_points=0).run()
    result["command"] = "test"
    paths = write_reports(result, tmp_path / "r")
    cells = {(c["config"], c["attack"]): c for c in result["cells"]}
    for attack in ("fgsm", "pgd", "bpda", "square"):
        assert cells[("jpeg+stream", attack)]["status"] == "done", cells[("jpeg+stream", attack)]
        same = {k for k in cells[("jpeg", attack)]["metrics"] if not k.endswith("seconds")}
        assert {k: cells[("jpeg+stream", attack)]["metrics"][k] for k in same} == \
            {k: cells[("jpeg", attack)]["metrics"][k] for k in same}, attack
    clean = {name: result["configs"][name]["clean"]["clean_accuracy"] for name in ("jpeg", "jpeg+stream")}
    assert clean["jpeg+stream"] == clean["jpeg"]
    md = paths["md"].read_text()
    assert "bl(stateful,block; not run: no client's query stream, see --threat endpoint)" in md
    assert "jpeg(jpeg,reject)," in md and "jpeg(jpeg,reject; not run" not in md
