"""The node-sharded head against DDP on a replicated head and a vocab-parallel flat head.

For world sizes 2 and 4 (gloo, CPU, one thread per process) and 1k to 10M classes, one
training step (forward, backward, optimizer) of three heads on the same ``hidden``-d features:

- ``sharded``: :class:`hsoftmax.distributed.ShardedHierarchicalSoftmax` (``sparse=True``,
  :class:`hsoftmax.SparseRowAdamW` on the shard, AdamW on the replicated parts);
- ``ddp``: the full :class:`hsoftmax.HierarchicalSoftmax` replicated on every rank under
  DDP (AdamW);
- ``vocab_parallel``: a flat softmax whose classes are sharded across the ranks, Megatron
  style (written here as the baseline): the hidden vectors and targets are all-gathered, each
  rank computes the logits of its classes, and the max, the sum of exponentials and the target
  logit are all-reduced (AdamW).

Per rank it records the head's state (parameters and Adam moments, bytes), the bytes sent per
step and the step time (the slowest rank, median of the timed steps). Bytes are those each
rank sends under ring all-reduce / all-gather and direct all-to-all: counted from the
arguments of every ``torch.distributed`` collective called in a step, and, for DDP, whose
reducer runs in C++, computed from the parameters it all-reduces (``2 (W-1)/W`` of their bytes).
All methods of one world size run in one process group, one after the other, smallest first.

Run::

    python benchmarks/run_sharded.py        # writes benchmarks/results/sharded_cpu.{csv,md}
    python benchmarks/run_sharded.py --quick --out /tmp/sharded
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

import hsoftmax
from hsoftmax.distributed import ShardedCrossEntropy, _GatherFromRanks, shard_head

HERE = Path(__file__).resolve().parent
HIDDEN, IN_FEATURES, BATCH = 64, 64, 32
FIELDS = ["world", "method", "classes", "n_top", "n_bottom", "state_mb_per_rank",
          "bytes_per_step", "ms_per_step", "device", "torch", "dtype", "date"]
LIMITS = {"ddp": 1_000_000, "vocab_parallel": 1_000_000, "sharded": 10_000_000}


# -- counting what the collectives send ------------------------------------------------------------

SENT = [0]


def _counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        world = dist.get_world_size(group)
        if name == "all_gather":
            size = _bytes(args[1]) * (world - 1)
        elif name == "all_to_all_single":
            size = _bytes(args[1]) * (world - 1) // world
        elif name == "all_reduce":
            size = 2 * _bytes(args[0]) * (world - 1) // world
        else:  # broadcast, gather: not in a step
            size = 0
        SENT[0] += size
        return original(*args, **kwargs)

    return wrapper


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


for _name in ("all_gather", "all_to_all_single", "all_reduce"):
    setattr(dist, _name, _counting(_name, getattr(dist, _name)))


# -- the vocab-parallel flat baseline ------------------------------------------------------------


class VocabParallelHead(nn.Module):
    """A flat softmax on ``hidden``-d features whose classes are sharded across the ranks."""

    def __init__(self, num_classes: int, world: int, rank: int) -> None:
        super().__init__()
        chunk = -(-num_classes // world)
        self.start = min(rank * chunk, num_classes)
        self.stop = min((rank + 1) * chunk, num_classes)
        self.proj = nn.Linear(IN_FEATURES, HIDDEN)
        self.weight = nn.Parameter(torch.randn(self.stop - self.start, HIDDEN) / math.sqrt(HIDDEN))
        self.bias = nn.Parameter(torch.zeros(self.stop - self.start))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        hidden = torch.relu(self.proj(x))
        everyone = _GatherFromRanks.apply(hidden, None).flatten(0, 1)  # (world * batch, hidden)
        targets = torch.empty(world * y.shape[0], dtype=y.dtype)
        dist.all_gather(list(targets.view(world, -1).unbind(0)), y)
        logits = torch.addmm(self.bias, everyone, self.weight.t())  # this rank's classes
        top = logits.detach().max(1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        sum_exp = dist_fn.all_reduce((logits - top[:, None]).exp().sum(1))
        mine = (targets >= self.start) & (targets < self.stop)
        local = (targets - self.start).clamp(0, max(0, self.stop - self.start - 1))
        picked = logits.gather(1, local[:, None]).squeeze(1) if logits.shape[1] else logits.sum(1)
        target_logit = dist_fn.all_reduce(torch.where(mine, picked, 0.0))
        per_sample = sum_exp.log() + top - target_logit
        return per_sample.view(world, -1)[rank].mean()

    def sync(self) -> None:
        """Average the replicated projection's gradients, as DDP would."""
        for parameter in self.proj.parameters():
            assert parameter.grad is not None
            parameter.grad /= dist.get_world_size()
            dist.all_reduce(parameter.grad)


# -- one configuration ----------------------------------------------------------------------------


def _shape(classes: int) -> tuple[int, int]:
    n_bottom = max(1, round(math.sqrt(classes)))
    return -(-classes // n_bottom), n_bottom


def _state_bytes(params: list[Tensor]) -> int:
    return 3 * sum(_bytes(p) for p in params)  # parameters, exp_avg, exp_avg_sq


Setup = tuple[Callable[[], Tensor], list[Any], int, int]


def _setup(method: str, classes: int, world: int, rank: int) -> Setup:
    """``(step loss, optimizers, state bytes, extra bytes per step)`` for one method."""
    torch.manual_seed(0)
    n_top, n_bottom = _shape(classes)
    x = torch.randn(BATCH, IN_FEATURES)
    y = torch.randint(0, classes, (BATCH,), generator=torch.Generator().manual_seed(rank))
    if method == "sharded":
        with torch.device("meta"):
            full = hsoftmax.HierarchicalSoftmax(IN_FEATURES, n_top, n_bottom, HIDDEN,
                                                num_classes=classes, sparse=True)
        head = shard_head(full)
        head.to_empty(device="cpu")
        head.reset_parameters()
        dense, rows = hsoftmax.split_parameters(head)
        optimizers = [torch.optim.AdamW(dense), hsoftmax.SparseRowAdamW(rows)]
        criterion = ShardedCrossEntropy()
        state = _state_bytes(list(head.parameters()))
        return (lambda: criterion(head(x), y)), optimizers, state, 0
    if method == "ddp":
        full = hsoftmax.HierarchicalSoftmax(IN_FEATURES, n_top, n_bottom, HIDDEN,
                                            num_classes=classes)
        model = nn.parallel.DistributedDataParallel(full)
        full_criterion = hsoftmax.HierarchicalCrossEntropy()
        params: list[Tensor] = list(full.parameters())
        extra = 2 * sum(_bytes(p) for p in params) * (world - 1) // world  # DDP's all-reduce
        optimizers = [torch.optim.AdamW(params)]
        return (lambda: full_criterion(model(x), y)), optimizers, _state_bytes(params), extra
    flat = VocabParallelHead(classes, world, rank)

    def step() -> Tensor:
        loss = flat.loss(x, y)
        loss.backward()
        flat.sync()
        return loss.detach().requires_grad_()  # its backward is done

    return step, [torch.optim.AdamW(flat.parameters())], _state_bytes(list(flat.parameters())), 0


def _measure(method: str, classes: int, world: int, rank: int, steps: int) -> dict[str, Any]:
    loss_of, optimizers, state, extra = _setup(method, classes, world, rank)
    times, sent = [], []
    for i in range(2 + steps):
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        SENT[0] = 0
        start = time.perf_counter()
        loss_of().backward()
        for optimizer in optimizers:
            optimizer.step()
        elapsed = torch.tensor([time.perf_counter() - start])
        step_bytes = SENT[0] + extra
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= 2:
            times.append(float(elapsed))
            sent.append(step_bytes)
    n_top, n_bottom = _shape(classes)
    return {"world": world, "method": method, "classes": classes, "n_top": n_top,
            "n_bottom": n_bottom, "state_mb_per_rank": round(state / 2**20, 2),
            "bytes_per_step": max(sent), "ms_per_step": round(1e3 * statistics.median(times), 2)}


def _worker(rank: int, world: int, store: str, classes: list[int], steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for count in classes:
        for method in ("sharded", "vocab_parallel", "ddp"):
            if count <= LIMITS[method]:
                rows.append(_measure(method, count, world, rank, steps))
                if rank == 0:
                    print(rows[-1], flush=True)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _launch(world: int, classes: list[int], steps: int, tmp: Path) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out, store = tmp / f"rows{world}.pt", tmp / f"store{world}"
    store.unlink(missing_ok=True)
    args = [",".join(map(str, classes)), str(steps), str(store), str(out)]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world",
                               str(world), "--worker", *args], env=env) for r in range(world)]
    if any(proc.wait() for proc in procs):
        raise RuntimeError(f"a rank of world {world} failed")
    return torch.load(out)


def _markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Sharded head: memory, bytes and time per step (gloo, CPU)", "",
        f"`{command}`; hidden {HIDDEN}, {BATCH} samples per rank and step, one thread per rank "
        "on a shared 2-core machine (times with more ranks than cores are contended). State: "
        "parameters and Adam moments of the head on one rank. Bytes: sent by one rank per step.",
        "",
        "| world | classes | method | state per rank | bytes per step | ms per step |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['world']} | {int(r['classes']):,} | {r['method']} | "
                     f"{float(r['state_mb_per_rank']):,.2f} MB | {int(r['bytes_per_step']):,} | "
                     f"{float(r['ms_per_step']):,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1k and 10k classes, 2 steps")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--worker", nargs=4)
    a = p.parse_args(argv)
    if a.worker:
        classes, steps, store, out = a.worker
        _worker(a.rank, a.world, store, [int(c) for c in classes.split(",")], int(steps), out)
        return 0
    classes = [1_000, 10_000] if a.quick else [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
    steps = 2 if a.quick else 5
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in map(int, a.worlds.split(",")):
        rows += _launch(world, classes, steps, a.out)
        (a.out / f"rows{world}.pt").unlink(missing_ok=True)
        (a.out / f"store{world}").unlink(missing_ok=True)
    stamp = {"device": platform.processor() or "cpu", "torch": torch.__version__,
             "dtype": "float32", "date": _dt.date.today().isoformat()}
    with open(a.out / "sharded_cpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({**r, **stamp} for r in rows)
    command = "python benchmarks/run_sharded.py" + (" --quick" if a.quick else "")
    (a.out / "sharded_cpu.md").write_text(_markdown(rows, command))
    print(_markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
