"""bench/redteam/first_query.py: ART Square's l-inf starting point as the script draws it, and a run on a
tiny bundle writing its JSON, Markdown and plot under the names ``--out`` gives (it has dots)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("first_query_bench", ROOT / "bench" / "redteam" / "first_query.py")
fq = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = fq
SPEC.loader.exec_module(fq)


def test_starting_points_are_vertical_stripes_of_plus_minus_eps_clipped():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, size=(5, 3, 6, 7)).astype(np.float32)
    p = fq.starting_points(x, 0.1, 0.0, 1.0, rng)
    d = p - x
    assert p.dtype == np.float32 and p.shape == x.shape
    np.testing.assert_allclose(np.abs(d), 0.1, atol=1e-6)  # inside [0, 1]: nothing clipped
    assert (np.sign(d) == np.sign(d[:, :, :1, :])).all()  # one sign per item, channel and column
    assert len(np.unique(np.sign(d[:, :, 0, :]))) == 2
    edge = fq.starting_points(np.zeros((2, 1, 4, 4), np.float32), 0.1, 0.0, 1.0, rng)
    assert edge.min() == 0.0 and np.isclose(edge.max(), 0.1)  # clipped to the value range


def test_a_run_writes_its_three_files_and_counts_consistently(tiny_bundle, tmp_path):
    out = tmp_path / "redteam.first_query"
    assert fq.main(["--bundle", str(tiny_bundle), "--stages", "", "--n", "40", "--draws", "2", "--batch", "16",
                    "--out", str(out), "--no-progress"]) == 0
    result = json.loads((tmp_path / "redteam.first_query.json").read_text())
    assert (tmp_path / "redteam.first_query.png").stat().st_size > 0
    md = (tmp_path / "redteam.first_query.md").read_text()
    assert "![shares](redteam.first_query.png)" in md and "no stage (the model alone)" in md
    alone = result["configurations"]["no stage (the model alone)"]
    assert 0 < alone["flipped"]["n"] <= 80  # the draws of correctly classified images, 2 per image
    assert alone["flipped_and_accepted"] == alone["flipped"]  # no stage refuses anything
    lo, hi = alone["flipped"]["ci95"]
    assert lo <= alone["flipped"]["share"] <= hi
