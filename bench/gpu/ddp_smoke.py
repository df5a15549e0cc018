"""DDP under torchrun on this machine's devices: NCCL on CUDA (gloo on the CPU), even with one process.

    python -m torch.distributed.run --nproc_per_node 1 bench/gpu/ddp_smoke.py [--steps 20] [--out PATH]

``robustgate train`` wraps its model in DistributedDataParallel only when ``WORLD_SIZE`` > 1
(models/train.py), so ``torchrun --nproc_per_node 1`` runs its single-process path. This smoke test
makes the process group itself (``nccl`` when CUDA is available) and trains the project's default
CNN under DDP for ``--steps`` steps on random 28x28 batches: it checks that NCCL initialises, that an
all-reduce sums across ranks and that DDP's gradient hooks run, and times the steps. Rank 0 writes
OUT.json and OUT.md when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: python -m torch.distributed.run --nproc_per_node N bench/gpu/ddp_smoke.py")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    want = world * (world + 1) / 2
    if not torch.allclose(t, torch.full_like(t, want)):
        raise RuntimeError(f"all_reduce gave {t.tolist()}, expected {want}")

    from robustgate.models.archs import build_arch

    model = build_arch("cnn", in_channels=1, num_classes=10, width=16, hidden=256).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(rank)
    xs = torch.rand(args.steps, args.batch, 1, 28, 28, generator=g).to(device)
    ys = torch.randint(0, 10, (args.steps, args.batch), generator=g).to(device)
    losses = []
    for i in range(args.steps):
        if i == 1:  # step 0 is the warm-up (cuDNN autotuning, DDP's bucket set-up)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(xs[i]), ys[i])
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
        losses.append(float(loss))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grads_synced = all(p.grad is not None for p in model.parameters())
    dist.barrier()
    result = {"backend": backend, "world_size": world, "all_reduce_ok": True, "ddp_grads_present": grads_synced,
              "steps": args.steps, "batch_per_rank": args.batch, "seconds_after_warmup": seconds,
              "images_per_s": (args.steps - 1) * args.batch * world / seconds,
              "first_loss": losses[0], "last_loss": losses[-1], "command": command_line(),
              "machine": machine("cuda" if cuda else "cpu")}
    if rank == 0:
        print(f"DDP smoke: {backend}, world {world}, all_reduce ok, {result['images_per_s']:,.0f} images/s, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
        if args.out:
            md = (f"# DDP smoke: {backend}, world size {world}\n\n`{result['command']}`  \nmachine: {result['machine']}\n\n"
                  f"all_reduce correct; DDP gradients present: {grads_synced}; {args.steps - 1} timed steps of "
                  f"{args.batch} images per rank: {result['images_per_s']:,.0f} images/s; loss {losses[0]:.3f} -> "
                  f"{losses[-1]:.3f}\n")
            write(args.out, result, md)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
