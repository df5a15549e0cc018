"""Shared by the bench/gpu scripts: the machine's description and result files.

Imported as a sibling module (the scripts put their own folder first on ``sys.path``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def machine(device: str) -> dict:
    """Where a figure was measured: CPU model and cores, GPU name (on cuda), versions, revision."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:  # the GPU machine gets a copy of the working tree: maybe no .git, maybe no git
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    rev = rev or os.environ.get("ROBUSTGATE_REVISION", "")
    out = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "device": device, "robustgate_revision": rev or "unknown"}
    if device == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def write(out: Path, result: dict, markdown: str) -> None:
    """``out``.json and ``out``.md (``out``'s name may hold dots: ``gpu.serve``); folders made as needed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.parent / (out.name + ".json"), out.parent / (out.name + ".md")
    js.write_text(json.dumps(result, indent=2, default=float) + "\n")
    md.write_text(markdown)
    print(f"wrote {js} and {md}", flush=True)
