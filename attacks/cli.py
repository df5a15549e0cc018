"""``robustgate eval``: attack the served pipeline and write reports (see attacks/runner.py)."""

from __future__ import annotations

import argparse
import shlex
import sys

from robustgate.attacks.suite import ATTACKS


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    """Comma-separated attack names (checked in ``run`` against the threat model's attacks)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``robustgate eval`` (the parser should use ArgumentDefaultsHelpFormatter)."""
    from robustgate.models.data import add_data_arguments

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--pipeline", default=None,
                        help="YAML: a proxy config, {stages: [...]}, or {configs: {NAME: {stages: [...]}}}; "
                             "the undefended backbone ('none') is always evaluated too")
    parser.add_argument("--each-alone", action="store_true", help="also evaluate each stage alone")
    parser.add_argument("--threat", choices=["model", "endpoint"], default="model",
                        help="model: white-box and adaptive attacks on the served pipeline (needs the bundle); "
                             "endpoint: query-only attacks on a live proxy at --url (attacks/endpoint_redteam.py)")
    parser.add_argument("--attacks", type=_names, default=["pgd"],
                        help=f"comma-separated; --threat model: {', '.join(ATTACKS)}; --threat endpoint: "
                             "square, hopskipjump, each optionally -spacing/-transform/-sybil, and transfer")
    parser.add_argument("--eps", type=_floats, default=[0.1], help="l-inf radii, comma-separated")
    parser.add_argument("--eps-l2", type=_floats, default=[1.0, 2.0], help="l2 radii for cw, deepfool")
    parser.add_argument("--n", type=int, default=100, help="test images (the dataset's test split from --offset)")
    parser.add_argument("--offset", type=int, default=0, help="first test image")
    parser.add_argument("--steps", type=int, default=20, help="iterations of pgd/bpda/eot/joint")
    parser.add_argument("--restarts", type=int, default=1, help="restarts of pgd/bpda/eot/joint")
    parser.add_argument("--eot", type=int, default=8, help="EOT samples (only where a stage is randomized)")
    parser.add_argument("--queries", type=_ints, default=[500],
                        help="query budget per item (square); --threat endpoint: comma-separated budgets, e.g. 1000,5000,10000")
    parser.add_argument("--radii", type=_floats, default=[0.0, 0.25, 0.5, 1.0], help="certified L2 radii")
    parser.add_argument("--batch-size", type=int, default=250, help="images per attack batch and served batch")
    parser.add_argument("--seed", type=int, default=0, help="attack seed (per batch: seed + first index)")
    parser.add_argument("--url", default=None, help="HOST:PORT of a live proxy for the square attack")
    parser.add_argument("--url-config", default=None, help="which configuration the live proxy serves")
    parser.add_argument("--model-name", default=None, help="served model name at --url (default: bundle name)")
    parser.add_argument("--twin-precision", choices=["float32", "bfloat16"], default="float32",
                        help="precision of the differentiable purifiers (the diffusion sampler) inside the attacked "
                             "pipeline twin; bfloat16: 1.61x per attack step here (bench/results/redteam.twin_precision.md), recorded per cell")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="where attacks are generated (the torch twin and its stages); auto = cuda when available. "
                             "The served pipeline keeps its config's pipeline.device")
    parser.add_argument("--surrogate", default=None,
                        help="bundle whose torch twin crafts transfer attacks when --bundle has no twin "
                             "(an imported model the converter could not handle)")
    add_data_arguments(parser)
    parser.add_argument("--surface-points", type=int, default=2, help="test points per config for loss surfaces")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--parallel", type=int, default=1,
                        help="worker processes computing cells at once, one torch thread each (e.g. one per core)")
    parser.add_argument("--out", required=True, help="report directory (cells cached in OUT/cells)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    from robustgate.attacks.channel import add_channel_arguments
    from robustgate.attacks.endpoint_cli import add_endpoint_arguments

    add_channel_arguments(parser)  # to --url
    add_endpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.threat == "endpoint":
        from robustgate.attacks.endpoint_cli import run_endpoint

        return run_endpoint(args)
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        print(f"robustgate eval: unknown attacks {unknown}; known: {', '.join(ATTACKS)} "
              "(query attacks on a live proxy: --threat endpoint)", file=sys.stderr)
        return 2
    if len(args.queries) != 1:
        print(f"robustgate eval: --queries takes one budget with --threat model, got {args.queries}", file=sys.stderr)
        return 2
    import torch

    from robustgate.attacks.channel import channel_from_args
    from robustgate.attacks.reports import write_reports
    from robustgate.attacks.runner import EvalSettings, Evaluation, load_pipelines
    from robustgate.models.bundle import Bundle, BundleError

    torch.set_num_threads(args.threads)
    if args.parallel < 1:
        print(f"robustgate eval: --parallel must be >= 1, got {args.parallel}", file=sys.stderr)
        return 2
    try:  # everything that validates the request, before the first attack runs
        bundle = Bundle.load(args.bundle)
        configs = load_pipelines(args.pipeline, each_alone=args.each_alone)
        settings = EvalSettings(
            attacks=args.attacks, eps=args.eps, eps_l2=args.eps_l2, n=args.n, offset=args.offset, steps=args.steps,
            restarts=args.restarts, eot=args.eot, queries=args.queries[0], radii=args.radii, batch_size=args.batch_size,
            seed=args.seed, url=args.url, model_name=args.model_name, twin_precision=args.twin_precision,
            url_config=args.url_config or (configs[-1].name if args.url else None),
            dataset=args.dataset, data_dir=None if args.data_dir is None else str(args.data_dir),
            device=args.device, surrogate=args.surrogate, channel=channel_from_args(args),
        )
        evaluation = Evaluation(bundle, configs, settings, args.out, progress=not args.no_progress,
                                surface_points=args.surface_points)
    except (BundleError, ValueError, OSError) as exc:
        print(f"robustgate eval: {exc}", file=sys.stderr)
        return 2
    result = evaluation.run(parallel=args.parallel)
    result["command"] = "robustgate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_reports(result, args.out)
    flags = [r for r in result["sanity"] if r["status"] == "FLAG"]
    print(f"wrote {paths['json']} and {paths['md']}; {len(result['cells'])} cells; "
          f"{len(flags)} sanity flag(s)")
    for r in flags:
        print(f"  FLAG {r['check']} {r['config']}: {r['detail']}")
    for attack, reason in result["skipped_attacks"].items():
        print(f"  SKIPPED {attack}: {reason}")
    return 0
