"""``robustgate eval --threat endpoint``: the arguments and the entry point of the endpoint red team.

attacks/cli.py owns the ``eval`` parser; it calls :func:`add_endpoint_arguments` once and, when
``--threat endpoint`` is given, hands the parsed arguments to :func:`run_endpoint`. Shared with
the model-threat evaluation: ``--url``, ``--model-name``, ``--bundle`` (the served model's name
when ``--model-name`` is not given), ``--attacks``, ``--eps``, ``--queries`` (here a list of
budgets), ``--n``, ``--offset``, ``--dataset``, ``--data-dir``, ``--seed``, ``--out``,
``--no-progress``. The test images come from ``--bundle``'s dataset (models/data.py, conformed to
its input), attacked ones from ``--offset``, benign ones right after them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from robustgate.attacks.channel import channel_from_args
from robustgate.attacks.endpoint_redteam import ADAPTATIONS, HSJ_EVALS, QUERY_ATTACKS, EndpointSettings, Transform


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("endpoint threat (--threat endpoint)")
    g.add_argument("--detection-stages", type=_names, default=["stateful_knn", "stateful"],
                   help="stage names whose rejections count as detections (a block always counts); default: "
                        "deploy/default.yaml's stateful stage and bundles/default's Blacklight one")
    g.add_argument("--identity-header", default="x-client-id", help="metadata header carrying a client identity")
    g.add_argument("--tokens-file", default=None,
                   help="bearer tokens, one per line: identity i sends 'authorization: Bearer <line i>' "
                        "(instead of --identity-header)")
    g.add_argument("--sybil-identities", type=int, default=8, help="identities of the -sybil attacks")
    g.add_argument("--benign-per-query", type=int, default=1, help="-spacing: benign queries before each attack query")
    g.add_argument("--wait-s", type=float, default=0.0, help="-spacing: seconds between attack queries")
    g.add_argument("--transform", type=float, nargs=3, default=[0.02, 0.02, 2],
                   metavar=("BRIGHTNESS", "NOISE", "RESAMPLE"),
                   help="-transform: brightness shift, uniform noise, re-draws of a rejected query")
    g.add_argument("--hsj-evals", type=int, nargs=2, default=list(HSJ_EVALS), metavar=("INIT", "MAX"),
                   help="HopSkipJump's gradient-estimate queries: at the first iteration (x sqrt(iteration)), at most")
    g.add_argument("--on-block", choices=["stop", "continue"], default="stop",
                   help="after a block: stop that image's attack")
    g.add_argument("--benign-n", type=int, default=1000, help="benign images (test set after the attacked ones)")
    g.add_argument("--benign-clients", type=int, default=100, help="benign identities the streams are split over")
    g.add_argument("--no-benign", action="store_true", help="skip the benign streams")


def run_endpoint(args: argparse.Namespace) -> int:
    """Runs :func:`~robustgate.attacks.endpoint_redteam.run_endpoint_matrix` once per ``--eps`` and
    writes results.json / results.md (one per eps under ``OUT/eps-<e>/`` when several)."""
    from robustgate.attacks.endpoint_redteam import run_endpoint_matrix
    from robustgate.models.bundle import Bundle
    from robustgate.models.client_values import ClientValues
    from robustgate.models.data import bundle_splits

    if not args.url:
        print("robustgate eval --threat endpoint: --url HOST:PORT of a live proxy is required", file=sys.stderr)
        return 2
    if not getattr(args, "bundle", None):
        print("robustgate eval --threat endpoint: --bundle (the served model's bundle: its dataset and classes) "
              "is required", file=sys.stderr)
        return 2
    bundle = Bundle.load(args.bundle)
    model = args.model_name or bundle.name
    budgets = args.queries if isinstance(args.queries, list) else [int(args.queries)]
    tokens = None
    if args.tokens_file:
        tokens = [t.strip() for t in Path(args.tokens_file).read_text().splitlines() if t.strip()]
    attacks = [a for a in args.attacks if a == "transfer" or a.partition("-")[0] in QUERY_ATTACKS]
    if not attacks:
        print(f"robustgate eval --threat endpoint: --attacks names none of transfer, {', '.join(QUERY_ATTACKS)} "
              f"(each optionally -{'/-'.join(ADAPTATIONS)})", file=sys.stderr)
        return 2
    surrogate = None
    if args.surrogate:
        from robustgate.models.twin import load_backbone

        surrogate = load_backbone(args.surrogate)
    splits = bundle_splits(bundle, getattr(args, "dataset", None), getattr(args, "data_dir", None))
    if args.offset + args.n + args.benign_n > splits.size("test"):
        print(f"robustgate eval --threat endpoint: --offset {args.offset} + --n {args.n} + --benign-n {args.benign_n} "
              f"exceeds the {splits.size('test')} test items of {splits.name}", file=sys.stderr)
        return 2
    x, y = splits.take("test", args.n, args.offset)
    benign, _ = splits.take("test", args.benign_n, args.offset + args.n)  # disjoint from the attacked images
    command = "robustgate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for i, eps in enumerate(args.eps):
        try:
            settings = EndpointSettings(
                url=args.url, model=model, attacks=attacks, budgets=budgets, eps=eps,
                detection_stages=args.detection_stages, identity_header=args.identity_header, tokens=tokens,
                sybil_identities=args.sybil_identities, benign_per_query=args.benign_per_query, wait_s=args.wait_s,
                transform=Transform(args.transform[0], args.transform[1], int(args.transform[2])),
                on_block=args.on_block, hsj_evals=tuple(args.hsj_evals), seed=args.seed,
                client_values=ClientValues.of(bundle.input), channel=channel_from_args(args))
        except ValueError as exc:
            print(f"robustgate eval --threat endpoint: {exc}", file=sys.stderr)
            return 2
        out = Path(args.out) if len(args.eps) == 1 else Path(args.out) / f"eps-{eps:g}"
        run_endpoint_matrix(settings, x, y, classes=len(bundle.classes), benign=benign, surrogate=surrogate,
                            benign_streams=not args.no_benign and i == 0, benign_clients=args.benign_clients,
                            out=str(out), command=command, progress=not args.no_progress)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0

