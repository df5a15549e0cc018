"""bench/redteam/endpoint.py's report: the success targets carry their exact binomial 95% interval,
``--render`` writes a report again from its JSON alone (no attack runs), and ``--offset`` is the
attacked slice the report names."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("endpoint_bench", ROOT / "bench" / "redteam" / "endpoint.py")
ep = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = ep
SPEC.loader.exec_module(ep)


def cell(attack: str, successes: int, n: int) -> dict:
    """A finished cell of ``n`` images, the first ``successes`` of them broken at query 3."""
    items = [{"success_at": 3 if i < successes else None} for i in range(n)]
    return {"attack": attack, "budget": ep.TARGET_BUDGET, "status": "done", "threat_model": {"p_init": 0.3},
            "items": items,
            "metrics": {"n": n, "attack_success_rate": successes / n, "detected_share": 0.5,
                        "queries_to_first_detection_median": 12.0, "completed_before_detection_share": successes / n,
                        "queries_to_success_median": 3.0, "attack_queries": 1000}}


def report(offset: int = 0) -> dict:
    correct = [True] * 185 + [False] * 15
    return {"command": "python bench/redteam/endpoint.py --bundle B", "started_utc": "2026-12-05T00:00:00Z",
            "offset": offset, "machine": {"cpu": "cpu", "cores": 2, "robustgate_revision": "abc"},
            "bundle": "B", "bundle_note": "note", "pipeline": "deploy/default.yaml", "defended_stages": [],
            "eps": 0.1, "clean_correct": correct, "targets": [],
            "arms": {"undefended": {"wall_seconds": 1.0, "cells": [cell("square", 200, 200)]},
                     "defended": {"wall_seconds": 1.0, "cells": [cell("square", 20, 200)]}}}


def test_success_value_gives_the_exact_interval():
    correct = [True] * 185 + [False] * 15
    rate, text = ep.success_value(cell("square", 20, 200), correct)
    assert rate == pytest.approx(20 / 185)
    # Clopper-Pearson for 20 of 185: Beta(0.025; 20, 166) = 0.0673, Beta(0.975; 21, 165) = 0.1618
    assert text == "10.8% (20 of 185; 95% CI 6.7-16.2%)"
    assert ep.success_value(cell("square", 0, 3), [False] * 3)[1] == "no correctly classified image"


def test_render_rewrites_targets_and_report_from_the_json(tmp_path):
    out = tmp_path / "redteam.endpoint"
    data = report(offset=1200)
    Path(f"{out}.json").write_text(json.dumps(data))
    assert ep.main(["--render", "--out", str(out)]) == 0
    rendered = json.loads(Path(f"{out}.json").read_text())
    assert rendered["arms"] == data["arms"] and rendered["command"] == data["command"]  # nothing rerun
    assert rendered["render_command"].endswith(f"--render --out {out}") and rendered["rendered_utc"]
    line = next(t for t in rendered["targets"] if t["target"].startswith("square at 5000 queries, default"))
    assert line["value"] == "10.8% (20 of 185; 95% CI 6.7-16.2%)" and line["met"] is False
    md = (tmp_path / "redteam.endpoint.md").read_text()
    assert "Rendered again from its JSON, no attack rerun" in md
    assert "the test set's images 1200 to 1399" in md
    assert "| 10.8% (20 of 185; 95% CI 6.7-16.2%) | **no** |" in md


def test_render_of_a_missing_report_and_a_run_without_bundle_are_refused(tmp_path, capsys):
    assert ep.main(["--render", "--out", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ep.main(["--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--bundle is required" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_undefended_arm_answers_with_the_models_logits_unless_outputs_is_given(tmp_path):
    """deploy/default.yaml answers the label; the undefended arm is a bare model server's answer (the
    logits the undefended target is about) unless ``--outputs`` sets both arms' policy."""
    shipped = ROOT / "deploy" / "default.yaml"
    assert yaml.safe_load(shipped.read_text())["outputs"]["policy"] == "label"
    bundle = tmp_path / "b"
    und, dfd = (ep.arm_config(arm, bundle, shipped, 1) for arm in ep.ARMS)
    assert ep.arm_outputs(und) == {"policy": "logits"} and und["pipeline"]["stages"] == []
    assert ep.arm_outputs(dfd)["policy"] == "label"
    assert [s["name"] for s in dfd["pipeline"]["stages"]] == ["magnet_l1", "stateful_knn"]
    for arm in ep.ARMS:
        assert ep.arm_outputs(ep.arm_config(arm, bundle, shipped, 1, outputs="top_k"))["policy"] == "top_k"
    # the stateful stages' refusals are the detections the red team counts
    assert ep.detection_stages(dfd["pipeline"]["stages"]) == ["stateful_knn"]
    added = ep.defended_stages(shipped, ["{name: bl, kind: stateful}"], ["stateful_knn"])
    assert ep.detection_stages(added) == ["bl"]


def render(tmp_path, data: dict) -> str:
    out = tmp_path / "redteam.endpoint"
    Path(f"{out}.json").write_text(json.dumps(data))
    assert ep.main(["--render", "--out", str(out)]) == 0
    return (tmp_path / "redteam.endpoint.md").read_text()


def test_the_report_gives_each_arms_answers_and_targets_only_the_default_pipeline(tmp_path):
    data = report()
    data.update(outputs={"undefended": {"policy": "logits"}, "defended": {"policy": "label"}},
                pipeline_outputs={"policy": "label"})
    md = render(tmp_path, data)
    assert 'Answers: `outputs: {"policy": "logits"}` (undefended); `outputs: {"policy": "label"}` (defended)' in md
    assert "square at 5000 queries, undefended: success >= 80%" in md
    assert "square at 5000 queries, default pipeline: success <= 10%" in md and "Not the default" not in md
    # --outputs logits over a pipeline that answers the label: reported, not targeted
    data["outputs"] = {"undefended": {"policy": "logits"}, "defended": {"policy": "logits"}}
    md = render(tmp_path, data)
    assert "Not the default pipeline (answers logits, not the pipeline's label)" in md
    assert "default pipeline: success" not in md and "undefended: success >= 80%" in md
    # a record of before 2026-12-06 holds one outputs section, both arms', and no pipeline_outputs (the
    # pipeline answered logits then): a label run was not the default pipeline, nor is its undefended arm targeted
    del data["pipeline_outputs"]
    data["outputs"] = {"policy": "label"}
    md = render(tmp_path, data)
    assert 'Answers: `outputs: {"policy": "label"}` (both arms)' in md
    assert "undefended: success >= 80%" not in md and "default pipeline: success" not in md
    assert "answers label, not the pipeline's logits" in md
    data["dropped_stages"] = ["magnet_l1"]
    assert "(magnet_l1 left out; answers label, not the pipeline's logits)" in render(tmp_path, data)
