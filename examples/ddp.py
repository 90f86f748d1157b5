"""Data-parallel training of a hierarchical head with ``torch.distributed`` on CPU.

Two processes (``--world-size``) on this machine, the gloo backend, and
:class:`torch.nn.parallel.DistributedDataParallel` around a small network ending in
:class:`hsoftmax.HierarchicalSoftmax`. Each process trains on its own shard of a synthetic
data set; DDP averages the gradients, so the replicas stay identical, which the script checks at
the end. Every parameter gets a gradient at every step (the loss reads the bottom layers through
a gather), so ``find_unused_parameters`` stays ``False``.

Run::

    python examples/ddp.py            # 2 processes, 60 steps
    python examples/ddp.py --quick    # 2 processes, 5 steps

On several machines, launch the same ``worker`` with ``torchrun`` instead of ``spawn``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hsoftmax

IN_FEATURES, N_TOP, N_BOTTOM, HIDDEN = 64, 50, 40, 32


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model() -> nn.Module:
    """A small body and a hierarchical head of 2,000 classes (same seed on every rank)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, IN_FEATURES),
        nn.ReLU(),
        hsoftmax.HierarchicalSoftmax(IN_FEATURES, N_TOP, N_BOTTOM, HIDDEN),
    )


def make_data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic data set: one Gaussian cluster per class (same on every rank)."""
    g = torch.Generator().manual_seed(1)
    num_classes = N_TOP * N_BOTTOM
    centres = torch.randn(num_classes, IN_FEATURES, generator=g)
    y = torch.randint(0, num_classes, (samples,), generator=g)
    return centres[y] + 0.5 * torch.randn(samples, IN_FEATURES, generator=g), y


def worker(rank: int, world_size: int, port: int, steps: int, batch: int) -> None:
    """One training process.

    Args:
        rank: this process's rank.
        world_size: the number of processes.
        port: the rendezvous port on 127.0.0.1.
        steps: optimizer steps.
        batch: samples per step and process.
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(make_model())  # find_unused_parameters=False
        criterion = hsoftmax.HierarchicalCrossEntropy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x, y = make_data(steps * batch * world_size)
        shard = torch.arange(rank, len(y), world_size)  # this rank's samples
        x, y = x[shard], y[shard]
        start = time.perf_counter()
        for step in range(steps):
            idx = slice(step * batch, (step + 1) * batch)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x[idx]), y[idx])
            loss.backward()  # DDP all-reduces (averages) the gradients here
            optimizer.step()
            reduced = loss.detach().clone()
            dist.all_reduce(reduced)
            if rank == 0 and (step % max(1, steps // 6) == 0 or step == steps - 1):
                print(f"step {step + 1:>4}/{steps}  mean loss over ranks "
                      f"{float(reduced) / world_size:.3f}  {time.perf_counter() - start:5.1f}s",
                      flush=True)
        # every replica must hold the same parameters
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            print(f"replicas identical after {steps} steps: {same}", flush=True)
            if not same:
                raise RuntimeError("the DDP replicas diverged")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Spawn the processes.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description="DDP training of a hierarchical head on CPU.")
    parser.add_argument("--quick", action="store_true", help="5 steps, for the test suite")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64, help="samples per step and process")
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args(argv)
    steps = 5 if args.quick else args.steps
    print(f"{args.world_size} processes, gloo backend, {steps} steps of {args.batch} samples "
          f"each, {N_TOP * N_BOTTOM:,} classes", flush=True)
    # fork (Linux) starts faster than spawn: the children need not import torch again
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    mp.start_processes(worker, args=(args.world_size, free_port(), steps, args.batch),
                       nprocs=args.world_size, join=True, start_method=method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
