"""The ``robustgate`` command: dispatches each subcommand to the module of the part it belongs to.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when its subcommand runs, so ``robustgate serve`` does not load the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("robustgate.proxy.serve", "start the defense proxy (Open Inference Protocol over gRPC)"),
    "train": ("robustgate.models.cli", "train a (robust) backbone and write a bundle"),
    "import": ("robustgate.models.importer", "turn your own ONNX model (or a served one) into a bundle"),
    "fit": ("robustgate.defenses.cli", "fit and calibrate a defense into a bundle"),
    "eval": ("robustgate.attacks.cli", "attack the served pipeline and write reports"),
    "probe": ("robustgate.attacks.probe", "send clean and attacked test images to a running proxy"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every subcommand's help: epilogs as written (examples) and each option's default shown --
    argparse.ArgumentDefaultsHelpFormatter, except that an option whose help already states its
    default, or that has none (None, a switch), is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or isinstance(action.default, bool) or action.default is argparse.SUPPRESS
                or action.default in ([], {})):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="robustgate",
        description="Inference-time defense proxy for image classifiers.",
    )
    from robustgate import __version__

    parser.add_argument("--version", action="version", version=f"robustgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (_module, help_text) in SUBCOMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        parser.parse_args(argv)  # handles --help/--version, errors on unknown commands
        parser.print_help()
        return 2
    if importlib.util.find_spec("onnxruntime") is None and not ({"-h", "--help"} & set(argv)):
        # the core declares no ONNX Runtime: the `cpu` and `gpu` extras each bring one build (pyproject.toml)
        print(f"robustgate {command}: ONNX Runtime is not installed; install robustgate[cpu] "
              f"(or robustgate[gpu] for onnxruntime-gpu)", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    module.add_arguments(subparsers[command])
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
