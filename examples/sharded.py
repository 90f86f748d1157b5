"""Train a hierarchical head whose nodes are sharded across processes.

Each process holds the projection whole, and the top-layer rows and bottom layers of
``1 / world`` of the nodes (:class:`hsoftmax.distributed.ShardedHierarchicalSoftmax`), with
their optimizer state; the small backbone is replicated by DDP. Per step the ranks exchange
hidden vectors and targets, never bottom rows. At the end the script checks the exact top-5
of the sharded head against the full head gathered on rank 0, and saves a sharded checkpoint
of the head and its optimizer state with :mod:`torch.distributed.checkpoint`.

Run::

    torchrun --nproc-per-node 2 examples/sharded.py            # 2 processes, 60 steps
    torchrun --nproc-per-node 2 examples/sharded.py --quick    # 5 steps
    python examples/sharded.py --quick                         # starts torchrun itself

The gloo backend runs on CPU; with GPUs, pass ``--backend nccl`` (one GPU per process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hsoftmax
from hsoftmax.distributed import (
    gather_head,
    optimizer_state_dict,
    shard_head,
)

IN_FEATURES, N_TOP, N_BOTTOM, HIDDEN = 64, 200, 50, 32  # 10,000 classes


def make_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic data set: one Gaussian cluster per class."""
    centres = torch.randn(N_TOP * N_BOTTOM, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_TOP * N_BOTTOM, (samples,), generator=g)
    return centres[y] + 0.5 * torch.randn(samples, IN_FEATURES, generator=g), y


def train(steps: int, batch: int, backend: str) -> None:
    """One process of the training run (launched by torchrun)."""
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone: nn.Module = nn.Sequential(nn.Linear(IN_FEATURES, IN_FEATURES), nn.ReLU()).to(device)
    backbone = DistributedDataParallel(backbone)
    with torch.device("meta"):  # never allocated whole: each rank allocates its shard only
        full = hsoftmax.HierarchicalSoftmax(IN_FEATURES, N_TOP, N_BOTTOM, HIDDEN)
    head = shard_head(full)
    head.to_empty(device=device or "cpu")
    head.reset_parameters()  # the replicated parts are broadcast from rank 0
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=3e-3)
    criterion = hsoftmax.HierarchicalCrossEntropy()
    if rank == 0:
        print(f"{world} processes ({backend}), {N_TOP * N_BOTTOM:,} classes; rank 0 holds nodes "
              f"[{head.node_start}, {head.node_stop}) of {N_TOP}, "
              f"{head.bottom_weight.numel():,} of {N_TOP * N_BOTTOM * HIDDEN:,} bottom weights; "
              f"loss: {type(criterion).__name__}", flush=True)
    x, y = make_data(steps * batch, seed=10 + rank)  # this rank's samples
    start = time.perf_counter()
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(head(backbone(x[part].to(device))), y[part].to(device))
        loss.backward()  # DDP averages the backbone; the head averages proj/top, scales shards
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % max(1, steps // 6) == 0 or step == steps - 1):
            print(f"step {step + 1:>4}/{steps}  mean loss over ranks {float(mean) / world:.3f}  "
                  f"{time.perf_counter() - start:5.1f}s", flush=True)

    x_test, y_test = make_data(256, seed=1000 + rank)
    with torch.no_grad():
        features = backbone(x_test.to(device))
        _, classes = head.topk(features, 5)  # exact: a top-5 per shard, then a merge
        hits = (classes == y_test.to(classes.device)[:, None]).any(1).float().mean()
    full_head = gather_head(head, dst=0)  # the whole head on rank 0, for serving
    if rank == 0 and full_head is not None:
        with torch.no_grad():
            same = torch.equal(full_head.topk(features, 5)[1], classes)
        print(f"top-5 accuracy on rank 0's test samples: {float(hits):.3f}", flush=True)
        print(f"sharded top-5 equals the gathered head's: {same}", flush=True)
        if not same:
            raise RuntimeError("the sharded and the gathered heads disagree")
    with tempfile.TemporaryDirectory() as folder:  # a checkpoint any world size can load
        path = [folder]
        dist.broadcast_object_list(path)
        state = {"head": head.state_dict(), "optim": optimizer_state_dict(head, optimizer)}
        dcp.save(state, checkpoint_id=path[0])
        dist.barrier()
        if rank == 0:
            print(f"sharded checkpoint saved with torch.distributed.checkpoint: "
                  f"{len(os.listdir(path[0]))} files", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Train under torchrun, or start torchrun with 2 processes.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description="Train a node-sharded hierarchical head.")
    parser.add_argument("--quick", action="store_true", help="5 steps, for the test suite")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64, help="samples per step and process")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--nproc", type=int, default=2, help="processes, without torchrun")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:  # not under torchrun: start it
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.nproc}", __file__, *(argv or sys.argv[1:])]
        return subprocess.call(command)
    train(5 if args.quick else args.steps, args.batch, args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
