"""bench/training/mimir_compare.py's merge: one comparison from runs that each trained some arms.

Two real (tiny, CPU) ``compare`` runs -- one arm each, same settings and ``--arm-seconds`` -- are
merged (the second taking the first's per-step times, ``--calibration-from``); the merged report
scores both arms on the same images with the same per-image outcomes the parts recorded and gives
each model's steps, and the refusals (an arm trained twice, settings that differ, a calibration
from other settings) write nothing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("mimir_compare", ROOT / "bench" / "training" / "mimir_compare.py")
mc = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(mc)

pytest.importorskip("torchattacks")

TINY = ["--budget-minutes", "1", "--seeds", "0", "--n-eval", "8", "--n-val", "8", "--train-items", "256",
        "--attack", "apgd-ce", "--dim", "16", "--depth", "1", "--heads", "2", "--lam", "0.1",
        "--calibration-steps", "1", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mimir-parts")
    assert mc.main(["compare", "--arms", "scratch", "--arm-seconds", "2", "--out", str(d / "scratch"), *TINY]) == 0
    # the second part takes the first's per-step times: the same steps per arm in every part
    assert mc.main(["compare", "--arms", "mae", "--arm-seconds", "2", "--out", str(d / "mae"), *TINY,
                    "--calibration-from", str(d / "scratch.json")]) == 0
    return d


def test_merge_scores_every_arm_on_the_parts_outcomes(parts, tmp_path):
    out = tmp_path / "merged"
    assert mc.main(["merge", "--parts", str(parts / "scratch.json"), str(parts / "mae.json"), "--out", str(out)]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    a, b = (json.loads((parts / f"{arm}.json").read_text()) for arm in ("scratch", "mae"))
    assert merged["complete"] and merged["arms"] == ["mae", "scratch"] and merged["seeds"] == [0]
    assert merged["outcomes"] == {**a["outcomes"], **b["outcomes"]} and merged["n_eval"] == 8
    for arm, part in (("scratch", a), ("mae", b)):
        assert merged["summary"][arm]["robust_per_seed"] == part["summary"][arm]["robust_per_seed"]
        robust = part["outcomes"][f"{arm}:0"]["robust"]
        assert merged["summary"][arm]["robust_mean"] == pytest.approx(robust.count("1") / len(robust))
    pair = [p for p in merged["paired"] if {p["first"], p["second"]} == {"mae", "scratch"}]
    assert len(pair) == 1 and len(merged["parts"]) == 2 and merged["planned_train_seconds_per_arm"] == 2.0
    md = (tmp_path / "merged.md").read_text()
    assert md.startswith("# MIMIR comparison")
    # the plot beside it: a PNG the Markdown links, named in the JSON; each part has its own
    assert merged["plot"] == "merged.png" and "[merged.png](merged.png)" in md
    assert (tmp_path / "merged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a["plot"] == "scratch.png" and (parts / "scratch.png").is_file()
    # one calibration for both parts; each model's steps are reported
    assert b["seconds_per_step"] == a["seconds_per_step"] and "--calibration-from" in b["equal_compute"]
    assert "the same in every part" in merged["equal_compute"]
    ft = max(1, int(2.0 / a["seconds_per_step"]["pgd-at"]))
    assert merged["summary"]["scratch"]["steps_per_seed"] == [[0, ft]]
    assert merged["summary"]["mae"]["steps_per_seed"][0][1] == max(1, int(1.0 / a["seconds_per_step"]["pgd-at"]))


def test_merge_refuses_an_arm_twice_and_settings_that_differ(parts, tmp_path):
    with pytest.raises(SystemExit, match="scratch:0 is in both"):
        mc.main(["merge", "--parts", str(parts / "scratch.json"), str(parts / "scratch.json"), "--out", str(tmp_path / "x")])
    other = json.loads((parts / "mae.json").read_text())
    other["planned_train_seconds_per_arm"] = 3.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="planned_train_seconds_per_arm"):
        mc.main(["merge", "--parts", str(parts / "scratch.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit, match="batch_size"):  # per-step times of another batch size do not apply
        mc.main(["compare", "--arms", "mae", "--arm-seconds", "2", "--out", str(tmp_path / "y"), *TINY,
                 "--batch-size", "16", "--calibration-from", str(parts / "scratch.json")])
    assert not (tmp_path / "y.json").exists()
    (tmp_path / "sweep.json").write_text(json.dumps({"lams": [0.1]}))
    for bad, match in ((tmp_path / "none.json", "cannot read"), (tmp_path / "sweep.json", "not a compare result")):
        with pytest.raises(SystemExit, match=match):
            mc.main(["compare", "--arms", "mae", "--arm-seconds", "2", "--out", str(tmp_path / "y"), *TINY,
                     "--calibration-from", str(bad)])
    assert not (tmp_path / "y.json").exists()


def test_an_arm_the_first_part_did_not_calibrate_is_scaled_from_its_mae_time(parts, tmp_path):
    """A part that ran before the ``mimir-carry`` arm existed has no time for its step: the later part
    takes the first part's clean-MAE time times the ratio of the two measured in its own process."""
    old = json.loads((parts / "scratch.json").read_text())
    del old["seconds_per_step"]["mimir-carry"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert mc.main(["compare", "--arms", "mimir-carry", "--arm-seconds", "2", "--out", str(tmp_path / "carry"), *TINY,
                    "--calibration-from", str(tmp_path / "old.json")]) == 0
    carry = json.loads((tmp_path / "carry.json").read_text())
    ps = carry["seconds_per_step"]
    assert {k: ps[k] for k in old["seconds_per_step"]} == old["seconds_per_step"], "the part's own times kept"
    assert 0.5 < ps["mimir-carry"] / ps["mae"] < 3.0 and "mimir-carry: the part's mae time x" in carry["equal_compute"]
    assert carry["carry_over_mae_seconds_per_step"] == pytest.approx(ps["mimir-carry"] / ps["mae"])
    run = carry["runs"][0]
    assert run["pretrain"]["steps"] == max(1, int(1.0 / ps["mimir-carry"]))
    assert run["pretrain"]["config"]["perturbation"] == "carry" and run["pretrain"]["lam"] == 0.1
    assert mc.main(["merge", "--parts", str(tmp_path / "old.json"), str(tmp_path / "carry.json"),
                    "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["arms"] == ["mimir-carry", "scratch"]
    # the merged per-step times: the first part's, and the later part's for the kind the first lacks
    assert merged["seconds_per_step"] == ps and merged["carry_over_mae_seconds_per_step"] == pytest.approx(
        ps["mimir-carry"] / ps["mae"])
    assert f"mimir-carry: {tmp_path / 'carry.json'}'s time" in merged["equal_compute"]
    assert "the same in every part" in merged["equal_compute"]
    assert [(p["first"], p["second"]) for p in merged["paired"]] == [("mimir-carry", "scratch")]


def test_pairs_use_the_seeds_both_arms_share(parts, tmp_path):
    """A merge where one arm has more seeds than the other (a comparison still being run in parts):
    the pair is tested on the seeds both have, and says which."""
    mae = json.loads((parts / "mae.json").read_text())
    seed1 = json.loads(json.dumps(mae))  # the same part as if trained with seed 1 (outcomes flipped on two images)
    bits = seed1["outcomes"].pop("mae:0")
    flip = "".join(("0" if c == "1" else "1") if i < 2 else c for i, c in enumerate(bits["robust"]))
    seed1["outcomes"]["mae:1"] = {"clean": bits["clean"], "robust": flip}
    seed1["seeds"] = [1]
    for run in seed1["runs"]:
        run["seed"] = 1
    (tmp_path / "mae1.json").write_text(json.dumps(seed1))
    assert mc.main(["merge", "--parts", str(parts / "scratch.json"), str(parts / "mae.json"), str(tmp_path / "mae1.json"),
                    "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["seeds"] == [0, 1] and len(merged["summary"]["mae"]["robust_per_seed"]) == 2
    pair = next(p for p in merged["paired"] if (p["first"], p["second"]) == ("mae", "scratch"))
    assert pair["seeds"] == [0] and len(pair["mcnemar_per_seed"]) == 1
    alone = json.loads((parts / "scratch.json").read_text())
    scratch0 = alone["outcomes"]["scratch:0"]["robust"]
    want = (mae["outcomes"]["mae:0"]["robust"].count("1") - scratch0.count("1")) / len(scratch0)
    assert pair["bootstrap_seed_averaged"]["difference"] == pytest.approx(want)
    assert "| mae - scratch | 0 |" in (tmp_path / "merged.md").read_text()
