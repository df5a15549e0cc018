"""The Dockerfile: hadolint-clean, multi-stage, non-root, one install recipe with pinned versions.

No Docker engine runs here, so the image is linted and its inputs checked, never built.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")
LABELS = ("org.opencontainers.image.title:text", "org.opencontainers.image.description:text",
          "org.opencontainers.image.licenses:spdx", "io.robustgate.variant:text")
CONSTRAINTS = ROOT / "deploy" / "docker" / "constraints.txt"


def hadolint(path: Path) -> list[dict]:
    """Findings at every severity; inline ignore pragmas are disabled so nothing hides."""
    proc = subprocess.run(
        [str(HADOLINT), "--format", "json", "--no-fail", "--disable-ignore-pragma",
         "--strict-labels", *(a for label in LABELS for a in ("--require-label", label)), str(path)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout or "[]")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins, arg in instructions(text):
        if ins == "FROM":
            result.append([])
        if result:
            result[-1].append((ins, arg))
    return result


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; `!` re-includes.

    Written here because Docker's matcher (moby/patternmatcher) is Go-only and gitignore
    libraries (pathspec) differ from it on `*` and parents; the patterns used are plain globs."""
    parts = path.split("/")
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = glob_regex((raw[1:] if negate else raw).rstrip("/"))
        if any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts))):
            excluded = not negate
    return excluded


def glob_regex(pattern: str) -> str:
    """`**/` spans directories, `*` and `?` stay inside one path element."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_reports_nothing():
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_flags_a_bad_instruction(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "RUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3008", "DL3009", "DL3015"} <= codes


def test_image_is_multi_stage_non_root_and_serves_the_default_bundle():
    text = DOCKERFILE.read_text()
    build, runtime = stages(text)[0], stages(text)[-1]
    assert len(stages(text)) >= 2
    assert any(ins == "COPY" and arg.startswith("--from=build") for ins, arg in runtime)
    users = [arg for ins, arg in runtime if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "numeric USER so runAsNonRoot can verify it"
    entry = [json.loads(arg) for ins, arg in runtime if ins == "ENTRYPOINT"]
    assert entry[-1] == ["robustgate", "serve"]
    cmd = [json.loads(arg) for ins, arg in runtime if ins == "CMD"][-1]
    bundle = cmd[cmd.index("--bundle") + 1]
    assert bundle == "/opt/robustgate/bundles/default"
    workdirs = [arg for ins, arg in build if ins == "WORKDIR"]
    assert workdirs[-1] == "/opt/robustgate"
    exposed = {p for ins, arg in runtime if ins == "EXPOSE" for p in arg.split()}
    assert exposed == {"8001", "8002"}
    # The default bundle exists and is in the build context (COPY . . under /opt/robustgate).
    from robustgate.models.bundle import Bundle

    bundle = Bundle.load(ROOT / "bundles" / "default")  # every sha256 verified
    for art in bundle.artifacts().values():
        assert not dockerignored(f"bundles/default/{art.path}", ignore_patterns()), art.path
    assert not dockerignored("bundles/default/bundle.yaml", ignore_patterns())


def test_install_uses_the_readme_script_pinned_by_constraints():
    text = DOCKERFILE.read_text()
    build = stages(text)[0]
    runs = " ".join(arg for ins, arg in build if ins == "RUN")
    assert "bash scripts/install.sh" in runs
    env = " ".join(arg for ins, arg in build if ins == "ENV")
    assert "PIP_CONSTRAINT=/opt/robustgate/deploy/docker/constraints.txt" in env
    args = dict(arg.split("=", 1) for ins, arg in build if ins == "ARG" and "=" in arg)
    assert args["VARIANT"] == "cpu"
    assert "ROBUSTGATE_SKIP_APT=1" in env and "ROBUSTGATE_EXTRAS=cpu" in env, "runtime dependencies only (CPU runtime)"
    assert "gpu) export ROBUSTGATE_EXTRAS=gpu" in runs, "the GPU image installs the project's `gpu` extra"
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "ROBUSTGATE_SKIP_APT" in script and "ROBUSTGATE_EXTRAS" in script, "install.sh reads the switches"


def test_build_context_holds_every_shipped_package_and_nothing_private():
    patterns = ignore_patterns()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        rel = "/".join(package.split(".")[1:])
        init = f"{rel}/__init__.py" if rel else "__init__.py"
        assert not dockerignored(init, patterns), f"{package} is missing from the build context"
    for needed in ("pyproject.toml", "README.md", "scripts/install.sh", "deploy/docker/constraints.txt",
                   "proxy/backends/base.py", "protos/open_inference_grpc.proto"):
        assert not dockerignored(needed, patterns), needed
    for private in (".venv/bin/python", ".git/config", "tests/deploy/test_dockerfile.py", "runs/x/log.txt",
                    "bundles/experiment/bundle.yaml", "proxy/__pycache__/cli.cpython-311.pyc", "deploy/k8s/base/x.yaml"):
        assert dockerignored(private, patterns), private


@pytest.mark.parametrize(
    ("path", "patterns", "expected"),
    [
        ("a/b.txt", ["*"], True),
        ("a/b.txt", ["*", "!a/"], False),
        ("a/c/__pycache__/x.pyc", ["*", "!a/", "**/__pycache__"], True),
        ("b/a/x", ["*", "!a/"], True),
    ],
)
def test_dockerignore_matcher(path, patterns, expected):
    assert dockerignored(path, patterns) is expected


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = constraint_pins()
    extras = project["optional-dependencies"]
    for spec in project["dependencies"] + extras["cpu"] + extras["gpu"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {spec!r}"


def test_constraints_agree_with_the_pins_in_install_script():
    # A constraint that disagrees with install.sh's own `pip install x==v` makes pip refuse to resolve.
    pins = constraint_pins()
    script = (ROOT / "scripts" / "install.sh").read_text()
    pinned = {}
    for line in script.splitlines():
        if "pip install" in line and not line.lstrip().startswith("#"):
            for token in shlex.split(line):
                if re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", token):
                    name, version = token.split("==")
                    pinned[name.lower()] = version
    assert pinned, "install.sh pins torch/torchvision/torchattacks"
    for name, version in pinned.items():
        assert pins.get(name) == version, f"install.sh pins {name}=={version}, constraints {pins.get(name)}"
