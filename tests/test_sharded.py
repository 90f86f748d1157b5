"""The node-sharded head (:mod:`hsoftmax.distributed`) against DDP on the full head, on gloo.

The test launches this file as 2, then 4 worker processes (``python test_sharded.py rank
world store out ckpt``). Each rank runs every check in one process group and records, per
check, ``None`` or the first mismatch; a mismatch never stops a rank (the others would hang in
their next collective). The reference is one process that trains the full head on the
concatenated batches with the loss ``mean over ranks of each rank's mean loss``: the gradient
DDP gives. Everything runs in float64.

The heads: ``n_top=5, n_bottom=3`` with 13 classes (not a multiple of ``n_bottom``) in the
identity layout and 11 classes in a custom layout that leaves a node empty. With 4 ranks the
last rank holds no node (blocks of 2, 2, 1, 0). The batches: anything; every target on the
first rank's nodes; one node per rank; unequal batch sizes per rank; ignored targets.
"""

# Each check's lambda runs at once, inside the loop that defines it (Checks.run): B023 is moot.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import hsoftmax
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax, SparseRowAdamW
from hsoftmax.distributed import (
    ShardedCrossEntropy,
    ShardedHierarchicalSoftmax,
    ShardedOutput,
    gather_head,
    load_optimizer_state_dict,
    optimizer_state_dict,
    shard_head,
    shard_range,
)

IN, N_TOP, N_BOTTOM, HIDDEN = 6, 5, 3, 4
LAYOUTS = {"identity": None, "custom": "custom"}
REPO = Path(__file__).resolve().parents[1]
WORLDS = (2, 4)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def _slots(layout: str) -> Tensor | None:
    if layout == "identity":
        return None
    generator = torch.Generator().manual_seed(3)
    positions = torch.randperm(N_TOP * N_BOTTOM, generator=generator)
    positions = positions[positions // N_BOTTOM != 2]  # node 2 holds no class
    return positions[:11].clone()


def _full_model(layout: str, sparse: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    head = HierarchicalSoftmax(
        IN, N_TOP, N_BOTTOM, HIDDEN, num_classes=13 if layout == "identity" else None,
        class_slots=_slots(layout), dtype=torch.float64, sparse=sparse,
    )
    return nn.Sequential(nn.Linear(IN, IN, dtype=torch.float64), nn.Tanh(), head)


def _batches(layout: str, world: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Steps of per-rank batches ``(x, y)``."""
    head = _full_model(layout)[2]
    generator = torch.Generator().manual_seed(1)
    num_classes = head.num_classes
    node_of = head.class_slots // N_BOTTOM

    def batch(size: int, classes: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.randn(size, IN, generator=generator, dtype=torch.float64)
        return x, classes[torch.randint(0, len(classes), (size,), generator=generator)]

    every = torch.arange(num_classes)
    first = every[node_of < shard_range(N_TOP, world, 0)[1]]  # rank 0's nodes only
    nodes = node_of.unique()
    return [
        [batch(4, every) for _ in range(world)],
        [batch(4, first) for _ in range(world)],
        [batch(3, every[node_of == nodes[r % len(nodes)]]) for r in range(world)],
        [batch(2 + r, every) for r in range(world)],  # unequal sizes
        [batch(4, every) for _ in range(world)],
    ]


def _with_ignored(y: Tensor) -> Tensor:
    y = y.clone()
    y[::3] = -100
    return y


# -- the reference: one process, the full head, DDP's averaged loss ----------------------------


def _ddp_loss(model: nn.Module, step: list[tuple[Tensor, Tensor]], criterion: nn.Module) -> Tensor:
    return sum(criterion(model(x), y) for x, y in step) / len(step)


def _reference(layout: str, world: int, sparse: bool = False) -> dict[str, Any]:
    model = _full_model(layout, sparse)
    dense, rows = hsoftmax.split_parameters(model)
    optimizers = [torch.optim.AdamW(dense, lr=0.05)]
    if rows:
        optimizers.append(SparseRowAdamW(rows, lr=0.05))
    criterion = HierarchicalCrossEntropy()
    losses, grads = [], []
    for step in _batches(layout, world):
        for optimizer in optimizers:
            optimizer.zero_grad()
        losses.append([criterion(model(x), y).detach() for x, y in step])
        _ddp_loss(model, step, criterion).backward()
        grads.append({n: _dense(p.grad) for n, p in model.named_parameters()})
        for optimizer in optimizers:
            optimizer.step()
    return {"model": model, "losses": losses, "grads": grads, "optimizer": optimizers[0]}


def _dense(t: Tensor) -> Tensor:
    return (t.to_dense() if t.is_sparse else t).detach().clone()


# -- the ranks ---------------------------------------------------------------------------------


class Checks:
    """Named checks of one rank; a failure is recorded, never raised."""

    def __init__(self) -> None:
        self.results: dict[str, str | None] = {}

    def run(self, name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception:
            if self.results.get(name) is None:  # keep the first failure
                self.results[name] = traceback.format_exc(limit=4)[-3000:]
        else:
            self.results.setdefault(name, None)


def _sharded_model(layout: str, sparse: bool = False) -> nn.Sequential:
    """The backbone in DDP (as a user would), the head sharded."""
    full = _full_model(layout, sparse)
    body = nn.parallel.DistributedDataParallel(nn.Sequential(full[0], full[1]))
    return nn.Sequential(body, shard_head(full[2]))


def _sharded(name: str) -> bool:
    """Whether a parameter of the sharded model holds this rank's nodes only."""
    return "bottom" in name or ".top." in name


def _unwrap(name: str) -> str:
    return name.replace("0.module.0.", "0.").replace("0.module.1.", "1.")


def _check_training(checks: Checks, layout: str, world: int, rank: int, sparse: bool) -> Any:
    """AdamW steps (SparseRowAdamW on the shard with ``sparse``): losses, every gradient at
    every step, and the parameters after."""
    tag = f"{layout}{'-sparse' if sparse else ''}"
    ref = _reference(layout, world, sparse)
    model = _sharded_model(layout, sparse)
    head: ShardedHierarchicalSoftmax = model[1]
    dense, rows = hsoftmax.split_parameters(model)
    optimizers = [torch.optim.AdamW(dense, lr=0.05)]
    if rows:
        optimizers.append(SparseRowAdamW(rows, lr=0.05))
    shard = slice(head.node_start, head.node_stop)
    criterion = HierarchicalCrossEntropy()
    for i, step in enumerate(_batches(layout, world)):
        for optimizer in optimizers:
            optimizer.zero_grad()
        x, y = step[rank]
        loss = criterion(model(x), y)
        checks.run(f"loss-{tag}", lambda: torch.testing.assert_close(
            loss.detach(), ref["losses"][i][rank], msg=f"step {i}"))
        before = head.bottom_weight.detach().clone()
        loss.backward()
        for name, parameter in model.named_parameters():
            full = _unwrap(name).replace("1.", "2.", 1) if name.startswith("1.") else _unwrap(name)
            want = ref["grads"][i][full]
            if _sharded(name):
                want = want[shard]

            def compare(name: str = name, parameter: Any = parameter, want: Tensor = want) -> None:
                assert parameter.grad is not None, "no gradient"
                assert parameter.grad.is_sparse == (sparse and "bottom" in name)
                torch.testing.assert_close(_dense(parameter.grad), want, msg=f"step {i} {name}")

            checks.run(f"grad-{tag}", compare)
        for optimizer in optimizers:
            optimizer.step()
        if sparse:  # only the touched rows of the shard moved
            untouched = torch.ones(head.bottom_weight.shape[0], dtype=torch.bool)
            untouched[head.bottom_weight.grad.coalesce().indices()[0]] = False
            checks.run(f"sparse-rows-{tag}", lambda: torch.testing.assert_close(
                head.bottom_weight.detach()[untouched], before[untouched], rtol=0, atol=0))
    full_params = dict(ref["model"].named_parameters())

    def params() -> None:
        for name, parameter in model.named_parameters():
            full = _unwrap(name).replace("1.", "2.", 1) if name.startswith("1.") else _unwrap(name)
            want = full_params[full].detach()
            want = want[shard] if _sharded(name) else want
            torch.testing.assert_close(parameter.detach(), want, msg=name)

    checks.run(f"params-{tag}", params)
    return ref, model, optimizers[0]


def _check_inference(
    checks: Checks, layout: str, rank: int, full: nn.Sequential, model: nn.Sequential
) -> None:
    head: ShardedHierarchicalSoftmax = model[1]
    reference = full[2]
    generator = torch.Generator().manual_seed(10 + rank)
    x = full[1](full[0](torch.randn(3 + rank, IN, generator=generator, dtype=torch.float64)))
    with torch.no_grad():
        checks.run(f"log_probs-{layout}", lambda: torch.testing.assert_close(
            head.log_probs(x), reference.log_probs(x)))
        checks.run(f"predict-{layout}", lambda: torch.testing.assert_close(
            head.predict(x), reference.predict(x), rtol=0, atol=0))
        for k in (1, 4, reference.num_classes):
            def topk(k: int = k) -> None:
                values, classes = head.topk(x, k)
                want_values, want_classes = reference.topk(x, k)
                torch.testing.assert_close(values, want_values)
                torch.testing.assert_close(classes, want_classes, rtol=0, atol=0)
            checks.run(f"topk-{layout}", topk)
        x3 = x[:2].unsqueeze(0)  # leading dimensions (1, 2)
        checks.run(f"leading-dims-{layout}", lambda: torch.testing.assert_close(
            head(x3).topk(2)[0], reference(x3).topk(2)[0]))
        empty = x[:0] if rank == 0 else x  # a rank with no samples
        checks.run(f"empty-batch-{layout}", lambda: torch.testing.assert_close(
            head.log_probs(empty), reference.log_probs(empty)))
    gathered = gather_head(head, dst=0)
    everywhere = gather_head(head, dst=None)

    def same_state() -> None:
        assert (gathered is None) == (rank != 0)
        for got in (gathered, everywhere) if gathered is not None else (everywhere,):
            assert isinstance(got, HierarchicalSoftmax)
            want = reference.state_dict()
            assert got.state_dict().keys() == want.keys()
            for key, value in got.state_dict().items():
                torch.testing.assert_close(value, want[key], msg=key)

    checks.run(f"gather_head-{layout}", same_state)


def _check_loss_options(checks: Checks, layout: str, world: int, rank: int) -> None:
    """Class weights, label smoothing, ignored targets and the reductions: value and one
    backward's gradients."""
    step = [(x, _with_ignored(y)) for x, y in _batches(layout, world)[3]]
    num_classes = _full_model(layout)[2].num_classes
    weight = torch.linspace(0.5, 2.0, num_classes, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        options = {"weight": weight, "reduction": reduction, "label_smoothing": 0.2}
        full = _full_model(layout)
        criterion = HierarchicalCrossEntropy(**options)
        want = criterion(full(step[rank][0]), step[rank][1])
        total = sum(criterion(full(x), y).sum() for x, y in step) / world
        total.backward()
        model = _sharded_model(layout)
        got = ShardedCrossEntropy(**options)(model(step[rank][0]), step[rank][1])
        got.sum().backward()
        checks.run(f"options-loss-{layout}", lambda: torch.testing.assert_close(
            got.detach(), want.detach(), msg=reduction))
        head, shard = model[1], slice(model[1].node_start, model[1].node_stop)
        checks.run(f"options-grad-{layout}", lambda: torch.testing.assert_close(
            head.bottom_weight.grad, full[2].bottom_weight.grad[shard], msg=reduction))
        checks.run(f"options-grad-{layout}", lambda: torch.testing.assert_close(
            head.proj.weight.grad, full[2].proj.weight.grad, msg=reduction))


def _check_construction(checks: Checks, world: int, rank: int, store: Path) -> None:
    """Without a full head: directly, and from the meta device; replicated parts equal."""

    def direct() -> None:
        torch.manual_seed(rank)  # different seeds: the replicated parts are broadcast
        local = ShardedHierarchicalSoftmax(IN, N_TOP, N_BOTTOM, HIDDEN, num_classes=13,
                                           dtype=torch.float64)
        start, stop = shard_range(N_TOP, world, rank)
        assert local.bottom_weight.shape == (stop - start, N_BOTTOM, HIDDEN)
        flat = torch.cat([p.detach().reshape(-1) for p in local.replicated_parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        assert all(torch.equal(everyone[0], other) for other in everyone)

    checks.run("construct-direct", direct)

    def meta() -> None:
        slots = _slots("custom")
        with torch.device("meta"):
            full = HierarchicalSoftmax(IN, N_TOP, N_BOTTOM, HIDDEN, class_slots=slots)
        local = shard_head(full)
        assert local.bottom_weight.is_meta
        local.to_empty(device="cpu")
        local.reset_parameters()
        assert torch.isfinite(local.bottom_weight).all()
        assert local.slot_classes is not None and local.num_classes == 11
        torch.testing.assert_close(local.class_slots, _slots("custom"))

    checks.run("construct-meta", meta)


def _check_checkpoints(
    checks: Checks, world: int, rank: int, ckpt: Path, ref: dict[str, Any], model: nn.Sequential,
    optimizer: torch.optim.Optimizer,
) -> None:
    """``torch.distributed.checkpoint`` of the head and its optimizer state: saved by the
    2-rank run, loaded by the 4-rank run (another world size); and a full head's state dict
    loads into a shard."""
    import torch.distributed.checkpoint as dcp

    head: ShardedHierarchicalSoftmax = model[1]
    x = torch.randn(3, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if world == 2:
        state = {"head": head.state_dict(), "optim": optimizer_state_dict(head, optimizer)}
        dcp.save(state, checkpoint_id=str(ckpt / "dcp"))
        if rank == 0:
            full = ref["model"][2]
            moments = {name: ref["optimizer"].state[getattr_path(full, name)]
                       for name in ("proj.weight", "top.weight", "bottom_weight")}
            torch.save({"head": full.state_dict(), "moments": moments}, ckpt / "reference.pt")
        return

    def fresh() -> ShardedHierarchicalSoftmax:
        torch.manual_seed(123)
        return shard_head(HierarchicalSoftmax(IN, N_TOP, N_BOTTOM, HIDDEN, num_classes=13,
                                              dtype=torch.float64))

    def resharded() -> None:
        local = fresh()
        adamw = torch.optim.AdamW(local.parameters(), lr=0.05)
        state = {"head": local.state_dict(), "optim": optimizer_state_dict(local, adamw)}
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
        local.load_state_dict(state["head"])
        load_optimizer_state_dict(local, adamw, state["optim"])
        saved = torch.load(ckpt / "reference.pt")  # what the 2 ranks trained
        trained = HierarchicalSoftmax(IN, N_TOP, N_BOTTOM, HIDDEN, num_classes=13,
                                      dtype=torch.float64)
        trained.load_state_dict(saved["head"])
        with torch.no_grad():
            torch.testing.assert_close(local.log_probs(x), trained.log_probs(x))
        rows = slice(local.node_start, local.node_stop)
        for name, want in saved["moments"].items():
            got = adamw.state[getattr_path(local, name)]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                expected = want[key] if name == "proj.weight" or key == "step" else want[key][rows]
                torch.testing.assert_close(got[key], expected, msg=f"{name} {key}")

    checks.run("dcp-other-world-size", resharded)

    def from_full() -> None:
        local = fresh()
        trained = ref["model"][2]
        local.load_state_dict(trained.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(local.log_probs(x), trained.log_probs(x))

    checks.run("load-full-state-dict", from_full)

    def sparse_state() -> None:
        local = ShardedHierarchicalSoftmax(IN, N_TOP, N_BOTTOM, HIDDEN, sparse=True)
        dense, rows = hsoftmax.split_parameters(local)
        optimizers = [torch.optim.AdamW(dense), SparseRowAdamW(rows)]
        before = [p.detach().clone() for p in local.parameters()]
        state = optimizer_state_dict(local, optimizers[1])
        assert set(state) == {"bottom_weight", "bottom_bias"}
        assert state["bottom_weight"]["exp_avg"].shape == (N_TOP, N_BOTTOM, HIDDEN)
        assert all(torch.equal(a, b) for a, b in zip(before, local.parameters(), strict=True))
        assert all(p.grad is None for p in local.parameters())

    checks.run("optimizer-state-sparse", sparse_state)


def getattr_path(module: nn.Module, name: str) -> nn.Parameter:
    return module.get_parameter(name)


def _check_bytes(checks: Checks, world: int, rank: int) -> None:
    """The bytes that a training step moves do not depend on the number of classes: a step
    of a 15-position head and of a 3,000-position head, same batch and widths."""
    moved = [0]
    names = ("all_gather", "all_to_all_single", "all_reduce", "broadcast", "gather")
    originals = {name: getattr(dist, name) for name in names}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            moved[0] += sum(a.numel() * a.element_size() for a in args if isinstance(a, Tensor))
            return originals[name](*args, **kwargs)
        return call

    def step_bytes(n_top: int, n_bottom: int) -> int:
        torch.manual_seed(0)
        head = ShardedHierarchicalSoftmax(IN, n_top, n_bottom, HIDDEN, dtype=torch.float64)
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(4, IN, dtype=torch.float64, generator=generator)
        y = torch.randint(0, n_top * n_bottom, (4,), generator=generator)
        for name in names:
            setattr(dist, name, counting(name))
        try:
            moved[0] = 0
            ShardedCrossEntropy()(head(x), y).backward()
            return moved[0]
        finally:
            for name in names:
                setattr(dist, name, originals[name])

    small, large = step_bytes(N_TOP, N_BOTTOM), step_bytes(60, 50)

    def same() -> None:
        assert small == large, f"{small} bytes at 15 positions, {large} at 3,000"
        assert small > 0

    checks.run("bytes-independent-of-classes", same)


def _worker(rank: int, world: int, store: str, out: str, ckpt: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    checks = Checks()
    start = time.perf_counter()
    try:
        for layout in LAYOUTS:
            ref, model, optimizer = _check_training(checks, layout, world, rank, sparse=False)
            full = ref["model"]
            _check_inference(checks, layout, rank, full, model)
            _check_loss_options(checks, layout, world, rank)
            if layout == "identity":
                _check_checkpoints(checks, world, rank, Path(ckpt), ref, model, optimizer)
        _check_training(checks, "custom", world, rank, sparse=True)
        _check_construction(checks, world, rank, Path(store))
        _check_bytes(checks, world, rank)
        output = model[1](torch.zeros(1, IN, dtype=torch.float64))
        checks.results["isinstance-output"] = (
            None if isinstance(output, ShardedOutput) else "not a ShardedOutput")
    finally:
        checks.results["seconds"] = f"{time.perf_counter() - start:.1f}"  # type: ignore[assignment]
        torch.save(checks.results, out)
        gc.collect()  # DDP wrappers and their pending work go before the process group
        dist.barrier()
        dist.destroy_process_group()


# -- the launch --------------------------------------------------------------------------------


def _launch(world: int, tmp: Path, ckpt: Path) -> list[dict[str, str | None]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    outs = [tmp / f"rank{rank}.pt" for rank in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(world), str(tmp / "store"), str(out),
             str(ckpt)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank, out in enumerate(outs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} of {world} failed:\n{log[-4000:]}"
    return [torch.load(out) for out in outs]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Both launches, 2 ranks then 4 (which loads the checkpoint the 2 ranks saved)."""
    ckpt = tmp_path_factory.mktemp("sharded-ckpt")
    return {world: _launch(world, tmp_path_factory.mktemp(f"sharded-{world}"), ckpt)
            for world in WORLDS}


CHECKS = [
    *(f"{kind}-{layout}" for layout in LAYOUTS for kind in (
        "loss", "grad", "params", "log_probs", "predict", "topk", "leading-dims", "empty-batch",
        "gather_head", "options-loss", "options-grad")),
    "loss-custom-sparse", "grad-custom-sparse", "params-custom-sparse", "sparse-rows-custom-sparse",
    "construct-direct", "construct-meta", "isinstance-output", "bytes-independent-of-classes",
]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", CHECKS)
def test_sharded_matches_ddp(launched: dict[int, list[dict[str, Any]]], world: int,
                             check: str) -> None:
    for rank, results in enumerate(launched[world]):
        assert check in results, f"rank {rank} of {world} did not run {check}"
        assert results[check] is None, f"rank {rank} of {world}: {results[check]}"


@pytest.mark.parametrize(
    "check", ["dcp-other-world-size", "load-full-state-dict", "optimizer-state-sparse"])
def test_checkpoints(launched: dict[int, list[dict[str, Any]]], check: str) -> None:
    """Saved with 2 ranks by ``torch.distributed.checkpoint``, loaded with 4."""
    for rank, results in enumerate(launched[4]):
        assert results.get(check, "not run") is None, f"rank {rank} of 4: {results.get(check)}"


def test_hierarchical_cross_entropy_dispatches() -> None:
    """``HierarchicalCrossEntropy()(local(x), y)`` hands a sharded output to its own loss (the
    ranks above train through it)."""

    class Probe:
        def cross_entropy(self, target: Tensor, **options: Any) -> str:
            return "dispatched"

    loss = hsoftmax.functional.hierarchical_cross_entropy(Probe(), torch.zeros(1))  # type: ignore[arg-type]
    assert loss == "dispatched"


def test_shard_range_covers_every_node_once() -> None:
    for n_top in range(1, 12):
        for world in range(1, 9):
            ranges = [shard_range(n_top, world, r) for r in range(world)]
            covered = [n for start, stop in ranges for n in range(start, stop)]
            assert covered == list(range(n_top))
            assert [stop - start for start, stop in ranges] == [
                len(c) for c in torch.arange(n_top).chunk(world)] + [0] * (
                world - len(torch.arange(n_top).chunk(world)))


def test_needs_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="process group"):
        ShardedHierarchicalSoftmax(IN, N_TOP, N_BOTTOM, HIDDEN)



def test_example_quick_under_torchrun() -> None:
    """``torchrun --nproc-per-node 2 examples/sharded.py --quick``: trains, matches the
    gathered head, saves a sharded checkpoint."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "examples" / "sharded.py"), "--quick"],
        capture_output=True, text=True, env=env, timeout=240, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step    5/5" in result.stdout
    assert "sharded top-5 equals the gathered head's: True" in result.stdout
    assert "torch.distributed.checkpoint" in result.stdout



def test_sharding_plan_is_current() -> None:
    """``docs/generated/sharding_plan.md`` is what ``docs/scripts/sharding_plan.py`` writes."""
    import importlib.util

    path = REPO / "docs" / "scripts" / "sharding_plan.py"
    spec = importlib.util.spec_from_file_location("_sharding_plan", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.outputs().items():
        committed = (REPO / "docs" / "generated" / name).read_text()
        assert committed == text, "run: python docs/scripts/sharding_plan.py"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of the sharded-head tests")
    for argument in ("rank", "world", "store", "out", "ckpt"):
        parser.add_argument(argument)
    args = parser.parse_args()
    _worker(int(args.rank), int(args.world), args.store, args.out, args.ckpt)
