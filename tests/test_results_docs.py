"""The README's "Measured" table, bench/RESULTS.md and docs/EVALUATION.md's benchmark table are generated from the results files
(bench/report.py): they must be current, cite only files that exist, and the results folder must hold
one JSON + Markdown pair per benchmark, named after its script."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_readme_and_results_md_are_current(report):
    assert report.main(["--check"]) == 0, "a generated table is stale: run python bench/report.py"


def test_every_cited_source_exists(report):
    rows = report.rows()
    assert rows
    for row in rows:
        for src in row.sources:
            if "not yet recorded" in row.figure:
                continue
            assert (REPO / src).exists(), f"row {row.what!r} cites {src}, which does not exist"


def test_generated_files_link_only_to_existing_files():
    for doc in (REPO / "README.md", REPO / "bench" / "RESULTS.md", REPO / "docs" / "EVALUATION.md"):
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"


def test_a_missing_results_file_gives_a_not_yet_recorded_row(report, monkeypatch):
    real = report.load

    def load(rel: str) -> dict:
        if rel == "bench/results/redteam.run.json":
            raise report.Missing(rel)
        return real(rel)

    monkeypatch.setattr(report, "load", load)
    rows = report.rows()
    missing = [r for r in rows if "bench/results/redteam.run.json" in r.sources]
    assert missing and all("not yet recorded" in r.figure for r in missing)


def test_results_are_json_markdown_pairs_named_after_their_scripts():
    scripts = {(p.parent.name, p.stem) for ext in ("py", "sh") for p in (REPO / "bench").glob(f"*/*.{ext}")}
    for js in RESULTS.glob("*.json"):
        folder, script, *variant = js.stem.split(".")
        assert (folder, script) in scripts, f"{js.name}: no bench/{folder}/{script}.py (or .sh) wrote it"
        assert len(variant) <= 1, f"{js.name}: at most one variant"
        assert js.with_suffix(".md").is_file(), f"{js.name} has no Markdown twin"
        json.loads(js.read_text())
    for md in RESULTS.glob("*.md"):
        # a folder's notes (bench/results/<folder>.md) or the twin of a results file
        assert md.with_suffix(".json").is_file() or (REPO / "bench" / md.stem).is_dir(), f"{md.name}: no JSON twin"
