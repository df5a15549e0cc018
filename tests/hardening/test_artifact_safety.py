"""Artifact safety (issue 9, item 7): no code path can unpickle, and a bundle is only loaded when every
artifact matches its recorded sha256.

- ``unsafe_loads(source)`` walks a module's AST (import aliases resolved, so ``import torch as T;
  T.load(f)`` is ``torch.load``) and reports every way to deserialize executable objects: importing
  pickle, cPickle, _pickle, dill, joblib, cloudpickle or shelve (or ``__import__``/``import_module`` of
  them); ``torch.load`` without a literal ``weights_only=True``; ``torch.jit.load``;
  ``numpy.load(..., allow_pickle=<anything but False>)``; ``yaml.load``/``load_all`` without a safe
  loader, ``yaml.unsafe_load``/``full_load``; ``marshal.load(s)``; ``pandas.read_pickle``.
- The scan test runs it on every ``.py`` file of the repository (tests and benchmarks included;
  ``.venv`` and hidden folders excluded) and lists the findings as ``path:line: what``.
- A self-test feeds it one snippet per unsafe pattern (so the scan can fail) and safe look-alikes
  (so it does not cry wolf).
- The shipped default bundle, copied and changed by one byte in a fitted defense's artifact (MagNet's
  autoencoder, ONNX and safetensors), refuses to load -- ``Bundle.load`` and ``robustgate serve`` --
  with a message naming the file; an artifact declared as a pickle is refused by the manifest.
  (tests/proxy/test_config_and_lifecycle.py covers the backbone ONNX with one byte appended.)
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from robustgate.models.bundle import SAFE_SUFFIXES, Bundle, BundleError
from robustgate.proxy.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPO / "bundles" / "default"

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}
ALWAYS_UNSAFE_CALLS = {
    "torch.jit.load": "torch.jit.load unpickles TorchScript archives",
    "marshal.load": "marshal.load deserializes code objects",
    "marshal.loads": "marshal.loads deserializes code objects",
    "yaml.unsafe_load": "yaml.unsafe_load constructs arbitrary Python objects",
    "yaml.unsafe_load_all": "yaml.unsafe_load_all constructs arbitrary Python objects",
    "yaml.full_load": "yaml.full_load is not the safe loader (use yaml.safe_load)",
    "yaml.full_load_all": "yaml.full_load_all is not the safe loader (use yaml.safe_load_all)",
    "pandas.read_pickle": "pandas.read_pickle unpickles",
}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")
SKIP_PARTS = {".venv", "__pycache__", "node_modules"}


class _Scanner(ast.NodeVisitor):
    def __init__(self):
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ("np" -> "numpy")
        self.findings: list[tuple[int, str]] = []

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append((node.lineno, what))

    # ---- imports -----------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self.flag(node, f"import of {a.name} (unpickles)")
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for a in node.names:
            if module.split(".")[0] in UNSAFE_MODULES or a.name in UNSAFE_MODULES:
                self.flag(node, f"import of {module + '.' if module else ''}{a.name} (unpickles)")
            self.aliases[a.asname or a.name] = f"{module}.{a.name}" if module else a.name

    # ---- calls -------------------------------------------------------------------------------
    def qualname(self, node: ast.AST) -> str | None:
        """``a.b.c`` with the leftmost name resolved through the imports; None if not a dotted name."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualname(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg is not None}
        star_kwargs = any(k.arg is None for k in node.keywords)
        if name is not None and name.split(".")[0] in UNSAFE_MODULES:
            self.flag(node, f"call of {name} (unpickles)")
        elif name in ALWAYS_UNSAFE_CALLS:
            self.flag(node, ALWAYS_UNSAFE_CALLS[name])
        elif name in ("torch.load", "torch.serialization.load"):
            if not _is_const(kw.get("weights_only"), True):
                self.flag(node, f"{name} without weights_only=True unpickles")
        elif name in ("numpy.load",):
            if star_kwargs or ("allow_pickle" in kw and not _is_const(kw["allow_pickle"], False)):
                self.flag(node, "numpy.load with allow_pickle enabled (or not provably off) unpickles")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            loader_name = self.qualname(loader) if loader is not None else None
            if loader_name is None or not loader_name.endswith(SAFE_YAML_LOADERS):
                self.flag(node, f"{name} without a safe Loader (use yaml.safe_load)")
        elif name in ("__import__", "importlib.import_module") and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str) \
                    and target.value.split(".")[0] in UNSAFE_MODULES:
                self.flag(node, f"dynamic import of {target.value} (unpickles)")
        self.generic_visit(node)


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """``[(line, what), ...]`` for every unsafe deserialization in ``source`` (a Python module)."""
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename=filename))
    return sorted(scanner.findings)


def python_files(root: Path) -> list[Path]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in SKIP_PARTS or p.startswith(".") or p.endswith(".egg-info") for p in rel[:-1]):
            continue
        out.append(path)
    return out


# ---- the scan ----------------------------------------------------------------------------------
def test_no_unsafe_load_anywhere_in_the_repository():
    files = python_files(REPO)
    rel = {p.relative_to(REPO).as_posix() for p in files}
    # the scan really covers the code that reads artifacts (a broken walk must not pass vacuously)
    for must in ("proxy/server.py", "models/bundle.py", "defenses/runtime.py", "defenses/detect/magnet.py",
                 "models/train.py", "proxy/serve.py", "bench/hardening/fuzz.py", "tests/hardening/test_artifact_safety.py"):
        assert must in rel, f"{must} not scanned"
    assert len(files) > 100
    findings = [f"{p.relative_to(REPO)}:{line}: {what}" for p in files
                for line, what in unsafe_loads(p.read_text(encoding="utf-8"), str(p))]
    assert not findings, "unsafe deserialization:\n" + "\n".join(findings)


# ---- the scanner's self-test -------------------------------------------------------------------
UNSAFE = {
    "import pickle": "import pickle",
    "import cPickle": "import cPickle",
    "import _pickle as p": "import _pickle as p",
    "import dill": "import dill",
    "import joblib": "from x import y\nimport joblib",
    "import cloudpickle": "import cloudpickle",
    "import shelve": "import shelve",
    "from pickle import loads": "from pickle import loads as L",
    "from six.moves import cPickle": "from six.moves import cPickle",
    "__import__('pickle')": "m = __import__('pickle')",
    "importlib.import_module('dill')": "import importlib\nm = importlib.import_module('dill')",
    "pickle.loads": "import pickle as pk\ny = pk.loads(b)",
    "torch.load without weights_only": "import torch\nsd = torch.load('m.pt')",
    "torch.load weights_only=False": "import torch\nsd = torch.load('m.pt', weights_only=False)",
    "torch.load weights_only from a variable": "import torch\nsd = torch.load('m.pt', weights_only=flag)",
    "aliased torch.load": "import torch as T\nsd = T.load(f, map_location='cpu')",
    "from torch import load": "from torch import load\nsd = load(f)",
    "torch.serialization.load": "import torch\nsd = torch.serialization.load(f)",
    "torch.jit.load": "import torch\nm = torch.jit.load('m.ts')",
    "from torch import jit": "from torch import jit\nm = jit.load('m.ts')",
    "np.load allow_pickle=True": "import numpy as np\na = np.load('a.npy', allow_pickle=True)",
    "np.load allow_pickle from a variable": "import numpy as np\na = np.load('a.npy', allow_pickle=ok)",
    "np.load **kwargs": "import numpy as np\na = np.load('a.npy', **kw)",
    "yaml.load no Loader": "import yaml\nd = yaml.load(text)",
    "yaml.load Loader=yaml.Loader": "import yaml\nd = yaml.load(text, Loader=yaml.Loader)",
    "yaml.load positional FullLoader": "import yaml\nd = yaml.load(text, yaml.FullLoader)",
    "yaml.load UnsafeLoader": "import yaml\nd = yaml.load(text, Loader=yaml.UnsafeLoader)",
    "yaml.unsafe_load": "import yaml\nd = yaml.unsafe_load(text)",
    "yaml.full_load": "import yaml\nd = yaml.full_load(text)",
    "yaml.load_all": "import yaml\nd = list(yaml.load_all(text))",
    "marshal.loads": "import marshal\nc = marshal.loads(b)",
    "marshal.load": "from marshal import load\nc = load(fh)",
    "pandas.read_pickle": "import pandas as pd\ndf = pd.read_pickle('x.pkl')",
    "unsafe call inside a function": "import torch\n\ndef f(p):\n    return torch.load(p)\n",
}


@pytest.mark.parametrize("snippet", list(UNSAFE.values()), ids=list(UNSAFE))
def test_scanner_flags_every_unsafe_pattern_at_its_line(snippet):
    lines = snippet.splitlines()
    offending = len(lines)  # each snippet's unsafe statement is its last line
    found = unsafe_loads(snippet)
    assert found, f"not flagged: {snippet!r}"
    assert offending in [line for line, _ in found], found


SAFE = {
    "yaml.safe_load": "import yaml\nd = yaml.safe_load(text)",
    "yaml.load SafeLoader": "import yaml\nd = yaml.load(text, Loader=yaml.SafeLoader)",
    "yaml.load CSafeLoader positional": "import yaml\nd = yaml.load(text, yaml.CSafeLoader)",
    "torch.load weights_only=True": "import torch\nsd = torch.load('m.pt', map_location='cpu', weights_only=True)",
    "np.load default": "import numpy as np\na = np.load('a.npz')",
    "np.load allow_pickle=False": "import numpy as np\na = np.load('a.npy', allow_pickle=False)",
    "json / onnx / safetensors": ("import json, onnx\nfrom safetensors.torch import load_file\n"
                                  "a = json.load(fh); m = onnx.load('m.onnx'); sd = load_file('w.safetensors')"),
    "a method named load": "class B:\n    def load(self): ...\nB().load()\nbundle.load('x')",
    "a local name pickle": "pickle = 3\nx = pickle + 1",
    "the word in a string": "msg = 'never import pickle; torch.load is banned'",
    "Bundle.load": "from robustgate.models.bundle import Bundle\nb = Bundle.load('bundles/default')",
}


@pytest.mark.parametrize("snippet", list(SAFE.values()), ids=list(SAFE))
def test_scanner_leaves_safe_code_alone(snippet):
    assert unsafe_loads(snippet) == []


def test_scanner_reports_file_and_line(tmp_path):
    bad = tmp_path / "pkg" / "mod.py"
    bad.parent.mkdir()
    bad.write_text(textwrap.dedent("""\
        import numpy as np


        def restore(path):
            return np.load(path, allow_pickle=True)
    """))
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "site.py").write_text("import pickle\n")  # excluded like the real .venv
    files = python_files(tmp_path)
    assert files == [bad]
    report = [f"{p.relative_to(tmp_path)}:{line}: {what}" for p in files for line, what in unsafe_loads(p.read_text())]
    assert len(report) == 1 and report[0].startswith("pkg/mod.py:5: numpy.load"), report


# ---- bundle checksums --------------------------------------------------------------------------
@pytest.fixture
def default_bundle_copy(tmp_path) -> Path:
    """A copy of the shipped bundle: a trained backbone with a fitted, calibrated MagNet (magnet_l1)."""
    dst = tmp_path / "default"
    shutil.copytree(DEFAULT_BUNDLE, dst)
    return dst


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same length, one bit of one byte different
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("role, rel", [("ae_onnx", "defenses/magnet_l1/ae.onnx"),
                                       ("ae_weights", "defenses/magnet_l1/ae.safetensors")])
def test_a_defense_artifact_changed_by_one_byte_refuses_to_load(default_bundle_copy, capsys, role, rel):
    Bundle.load(default_bundle_copy)  # the untouched copy loads
    spec = yaml.safe_load((default_bundle_copy / "bundle.yaml").read_text())
    assert spec["defenses"]["magnet_l1"]["files"][role]["path"] == rel
    flip_one_byte(default_bundle_copy / rel)
    with pytest.raises(BundleError) as err:
        Bundle.load(default_bundle_copy)
    msg = str(err.value)
    assert "checksum mismatch" in msg and rel in msg and f"defenses.magnet_l1.files.{role}" in msg, msg
    # `robustgate serve` refuses it too: exit 2 naming the file, before binding anything
    config = default_bundle_copy.parent / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "bundle": str(default_bundle_copy),
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "metrics_host": "127.0.0.1"},
        "pipeline": {"stages": [{"name": "magnet_l1", "kind": "magnet", "action": "reject",
                                 "params": {"runtime": "onnx"}}]},
    }))
    assert cli_main(["serve", "--config", str(config)]) == 2
    err_text = capsys.readouterr().err
    assert "checksum mismatch" in err_text and rel in err_text, err_text


def test_an_artifact_declared_as_a_pickle_is_refused(default_bundle_copy):
    manifest = default_bundle_copy / "bundle.yaml"
    spec = yaml.safe_load(manifest.read_text())
    pkl = "defenses/magnet_l1/ae.pkl"
    shutil.copy(default_bundle_copy / "defenses/magnet_l1/ae.onnx", default_bundle_copy / pkl)
    spec["defenses"]["magnet_l1"]["files"]["ae_onnx"]["path"] = pkl  # same bytes, same sha256
    manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(BundleError) as err:
        Bundle.load(default_bundle_copy)
    assert pkl in str(err.value) and "no pickles" in str(err.value), str(err.value)


def test_shipped_bundles_hold_no_pickle():
    files = [p for p in (REPO / "bundles").rglob("*") if p.is_file()]
    assert any(p.suffix == ".onnx" for p in files)
    for p in files:
        assert p.name == "bundle.yaml" or p.name.endswith(SAFE_SUFFIXES), f"{p}: not an allowed artifact type"
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{p} looks like a pickle"
