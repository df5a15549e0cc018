"""``robustgate probe``: a client-side smoke check of a running proxy, for operators.

Sends test images of the bundle's dataset (``--dataset``/``--data-dir``, conformed to the bundle's
input shape by ``models.data.bundle_splits``) to the proxy, clean and PGD-attacked (the attack runs offline on
the torch twin of a local bundle's backbone -- a non-adaptive, transfer attack: it does not know
the served defenses), one ModelInfer per image, and prints how many were accepted, flagged,
rejected and correctly classified. It is a smoke check, not an evaluation: `robustgate eval` is.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from robustgate.attacks.channel import add_channel_arguments
    from robustgate.models.data import add_data_arguments

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--url", required=True, help="HOST:PORT of the proxy's gRPC endpoint")
    parser.add_argument("--n", type=int, default=32, help="test images (the dataset's test split from --offset)")
    parser.add_argument("--bundle", default="bundles/default", help="local bundle whose torch twin is attacked")
    parser.add_argument("--model-name", default=None, help="served model name (default: the bundle's name)")
    parser.add_argument("--model", dest="model_name", help=argparse.SUPPRESS)  # the flag's old name
    parser.add_argument("--eps", type=float, default=0.1, help="l-inf radius of the PGD attack")
    parser.add_argument("--steps", type=int, default=20, help="PGD iterations")
    parser.add_argument("--offset", type=int, default=0, help="first test image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per ModelInfer")
    add_channel_arguments(parser)
    add_data_arguments(parser)


def probe(url: str, bundle_dir: str, n: int = 32, model: str | None = None, eps: float = 0.1, steps: int = 20,
          offset: int = 0, timeout: float = 30.0, dataset: str | None = None,
          data_dir: str | None = None, channel=None) -> dict[str, dict[str, int]]:
    """Returns ``{"clean": counts, "pgd": counts}``, counts = sent/accepted/flagged/rejected/correct.
    ``channel``: TLS and a bearer token (attacks.endpoint.Channel)."""
    import torch

    from robustgate.attacks.differentiable import BackboneOnly
    from robustgate.attacks.endpoint import GrpcOracle
    from robustgate.attacks.suite import ATTACKS, AttackContext, threat_model
    from robustgate.attacks.threat import check_perturbation
    from robustgate.models.bundle import Bundle
    from robustgate.models.data import bundle_splits
    from robustgate.models.client_values import ClientValues
    from robustgate.models.twin import load_backbone

    bundle = Bundle.load(bundle_dir)
    splits = bundle_splits(bundle, dataset, data_dir)
    if offset + n > splits.size("test"):
        raise ValueError(f"asked for {n} test images from offset {offset}; {splits.name} has only {splits.size('test')}")
    x, y = splits.take("test", n, offset)  # conformed to the bundle's input
    backbone = BackboneOnly(load_backbone(bundle))
    tm = threat_model("pgd", eps, n=n, steps=steps, restarts=1, eot=1, queries=1)
    torch.manual_seed(0)
    x_adv = ATTACKS["pgd"].run(AttackContext(backbone, None, None, len(bundle.classes)), tm, x, y).detach()
    check_perturbation(x_adv, x, "linf", eps, who="probe pgd")
    oracle = GrpcOracle(url, model or bundle.name, timeout_s=timeout, client_values=ClientValues.of(bundle.input),
                        channel=channel)
    counts = {}
    try:
        for name, images in (("clean", x), (f"pgd eps={eps:g}", x_adv)):
            c = {"sent": 0, "accepted": 0, "flagged": 0, "rejected": 0, "correct": 0}
            for item, label in zip(images, y.tolist()):
                logits, verdict = oracle.answer(item)
                c["sent"] += 1
                c[("accepted", "flagged", "rejected")[verdict]] += 1
                if logits is not None and int(logits.argmax()) == label:
                    c["correct"] += 1
            counts[name] = c
    finally:
        oracle.close()
    return counts


def run(args: argparse.Namespace) -> int:
    from tritonclient.utils import InferenceServerException

    from robustgate.attacks.channel import channel_from_args
    from robustgate.models.bundle import BundleError

    try:
        counts = probe(args.url, args.bundle, n=args.n, model=args.model_name, eps=args.eps, steps=args.steps,
                       offset=args.offset, timeout=args.timeout, dataset=args.dataset,
                       data_dir=None if args.data_dir is None else str(args.data_dir),
                       channel=channel_from_args(args))
    except InferenceServerException as exc:
        print(f"robustgate probe: the proxy at {args.url} answered with an error: {exc}", file=sys.stderr)
        return 1
    except (BundleError, ValueError, OSError) as exc:  # NoTwin included: the probe attacks the twin
        print(f"robustgate probe: {exc}", file=sys.stderr)
        return 2
    print(f"{'images':<16}{'sent':>6}{'accepted':>10}{'flagged':>9}{'rejected':>10}{'correct':>9}")
    for name, c in counts.items():
        print(f"{name:<16}{c['sent']:>6}{c['accepted']:>10}{c['flagged']:>9}{c['rejected']:>10}{c['correct']:>9}")
    print("correct = accepted or flagged, and classified as the true label; rejected items count as not correct "
          "here (in `robustgate eval` a rejected attacked item counts as robust).")
    return 0
