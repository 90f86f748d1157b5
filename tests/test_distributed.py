"""Data parallel training: DDP and FSDP2 (``fully_shard``) on the gloo backend, 2 processes.

The test launches two copies of this file as worker processes (``python test_distributed.py
...``), which rendezvous through a file store, train a few steps on their half of each global
batch and save their gradients and parameters; the test compares them with single-process
training on the whole global batch. All modes run in one launch per device, to pay the start
of the processes once.

DDP runs without ``find_unused_parameters``: every parameter gets a gradient at every step,
even when the targets of a batch touch only one or two nodes, because the loss gathers the
rows of the target nodes from one ``(n_top, n_bottom, hidden)`` parameter, whose gradient is
dense (zero outside the touched nodes). DDP raises at the next step if a parameter got no
gradient, so several steps are run.
``sparse=True`` heads do not train under DDP (it expects sparse gradients from
``nn.Embedding`` only).

FSDP2 trains with the head in the root's group, with ``fully_shard(head,
reshard_after_forward=False)``, and with the usual ``fully_shard(head)`` then
``fully_shard(model)``: there the head's output carries a copy of the bottom layers, since FSDP2
frees the gathered parameters when the head's forward returns.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax

WORLD_SIZE = 2
N_TOP, N_BOTTOM, NUM_CLASSES = 4, 3, 10
LOCAL_BATCH = 4
LR = 0.5
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def _model(sparse: bool = False) -> nn.Sequential:
    """A small backbone and the head, in float64 (exact comparisons across processes)."""
    generator = torch.Generator().manual_seed(0)
    slots = torch.randperm(N_TOP * N_BOTTOM, generator=generator)[:NUM_CLASSES]
    torch.manual_seed(0)
    head = HierarchicalSoftmax(
        6, N_TOP, N_BOTTOM, 5, class_slots=slots, dtype=torch.float64, sparse=sparse
    )
    return nn.Sequential(nn.Linear(6, 6, dtype=torch.float64), nn.Tanh(), head)


def _classes_of_node(node: int) -> Tensor:
    slots = _model()[2].class_slots
    return torch.nonzero(slots // N_BOTTOM == node).squeeze(1)


def _global_batches() -> list[tuple[Tensor, Tensor]]:
    """Global batches of ``WORLD_SIZE * LOCAL_BATCH``; rank ``r`` takes the ``r``-th slice."""
    generator = torch.Generator().manual_seed(1)
    size = WORLD_SIZE * LOCAL_BATCH

    def x() -> Tensor:
        return torch.randn(size, 6, generator=generator, dtype=torch.float64)

    def some(classes: Tensor, n: int) -> Tensor:
        return classes[torch.randint(0, len(classes), (n,), generator=generator)]

    every = torch.arange(NUM_CLASSES)
    node_a, node_b = _classes_of_node(0), _classes_of_node(N_TOP - 1)
    return [
        (x(), some(every, size)),  # anything
        (x(), torch.cat([some(node_a, LOCAL_BATCH), some(node_b, LOCAL_BATCH)])),  # 1 node/rank
        (x(), some(node_a[:1], size)),  # one class everywhere: one node in the whole step
        (x(), some(every, size)),
    ]


def _full(t: Tensor) -> Tensor:
    """A DTensor (FSDP2) gathered, or a sparse gradient densified, to a plain tensor."""
    full_tensor = getattr(t, "full_tensor", None)
    t = full_tensor() if full_tensor is not None else t
    return (t.to_dense() if t.is_sparse else t).detach().cpu().clone()


def _train(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    device: torch.device,
    set_to_none: bool = True,
) -> dict[str, Any]:
    """SGD steps; the gradients of every step and the final parameters, by unwrapped name.

    With ``set_to_none=False`` the dense ``.grad`` is kept between steps.
    """
    criterion = HierarchicalCrossEntropy()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=set_to_none)
        criterion(model(x.to(device)), y.to(device)).backward()
        step = {}
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None, f"{name} got no gradient"
            step[name.removeprefix("module.")] = _full(parameter.grad)
        grads.append(step)
        optimizer.step()
    params = {n.removeprefix("module."): _full(p) for n, p in model.named_parameters()}
    return {"grads": grads, "params": params}


def _local(batches: list[tuple[Tensor, Tensor]], rank: int) -> list[tuple[Tensor, Tensor]]:
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return [(x[part], y[part]) for x, y in batches]


def _train_wrapped(mode: str, rank: int, device: torch.device) -> dict[str, Any]:
    """Wrap a fresh model as ``mode`` says and train it on this rank's halves."""
    model = _model(sparse=mode == "ddp-sparse").to(device)
    batches = _local(_global_batches(), rank)
    if mode.startswith("ddp"):
        keep = mode == "ddp-keep-grad"
        ddp = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=False, gradient_as_bucket_view=keep
        )
        if mode != "ddp-sparse":
            return _train(ddp, batches, device, set_to_none=not keep)
        try:  # DDP rejects sparse gradients of parameters not owned by a sparse nn.Embedding
            _train(ddp, batches, device)
        except Exception as error:
            return {"error": f"{type(error).__name__}: {error}"}
        return {"error": None}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (WORLD_SIZE,))
    if mode == "fsdp-root":  # the head stays in the root's group
        fully_shard(model[0], mesh=mesh)
    elif mode == "fsdp-head":  # the head is its own group, kept unsharded after forward
        fully_shard(model[2], mesh=mesh, reshard_after_forward=False)
    else:  # "fsdp-head-resharded": its own group, resharded after forward (the default)
        fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    result = _train(model, batches, device)
    x = _global_batches()[0][0].to(device)
    model.unshard()  # the root's group (the head's own group gathers itself)
    with torch.no_grad():
        result["log_probs"] = model[2].log_probs(model[1](model[0](x))).cpu()
    model.reshard()
    return result


def _worker(rank: int, store: str, modes: list[str], device_name: str, out: str) -> None:
    """One rank: for each mode, train on the local halves; save what it saw."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {mode: _train_wrapped(mode, rank, torch.device(device_name)) for mode in modes}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _modes(device: torch.device) -> list[str]:
    """DDP everywhere; FSDP2 on CPU (gloo) only."""
    fsdp = ["fsdp-root", "fsdp-head", "fsdp-head-resharded"]
    fsdp = fsdp if device.type == "cpu" and _fsdp2_available() else []
    return ["ddp", "ddp-keep-grad", "ddp-sparse", *fsdp]


def _launch(device: torch.device, tmp_path: Path) -> list[dict[str, Any]]:
    """Run the two ranks (every mode in one process group) and load what each saved."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = tmp_path / "store"
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    modes = ",".join(_modes(device))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(store), modes, str(device), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
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
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [torch.load(out) for out in outs]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Launch the ranks once per device for the whole module; ``launched(device, mode)``."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def get(device: torch.device, mode: str) -> list[dict[str, Any]]:
        if mode not in _modes(device):
            pytest.skip(f"{mode} is checked on CPU with gloo (and a torch with fully_shard)")
        if str(device) not in cache:
            cache[str(device)] = _launch(device, tmp_path_factory.mktemp(f"dist-{device.type}"))
        return [result[mode] for result in cache[str(device)]]

    return get


def _assert_matches_single_process(results: list[dict[str, Any]]) -> None:
    reference = _train(_model(), _global_batches(), torch.device("cpu"))
    for rank, result in enumerate(results):
        assert len(result["grads"]) == len(reference["grads"])
        for step, (got, want) in enumerate(zip(result["grads"], reference["grads"], strict=True)):
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(
                    got[name], want[name], msg=f"rank {rank}, step {step}, grad of {name}"
                )
        for name, value in reference["params"].items():
            torch.testing.assert_close(result["params"][name], value, msg=f"rank {rank}, {name}")


def test_batches_touch_few_nodes() -> None:
    """The setup is what it claims: some steps touch one node per rank, or one in all."""
    slots = _model()[2].class_slots
    batches = _global_batches()
    for _x, y in _local(batches[1:2], 0) + _local(batches[1:2], 1) + batches[2:3]:
        assert (slots[y] // N_BOTTOM).unique().numel() == 1


@pytest.mark.parametrize("mode", ["ddp", "ddp-keep-grad"])
def test_ddp_matches_single_process(device: torch.device, launched: Any, mode: str) -> None:
    """Without find_unused_parameters; ``ddp-keep-grad`` keeps the dense ``.grad`` between
    steps (``zero_grad(set_to_none=False)``, gradients as bucket views)."""
    _assert_matches_single_process(launched(device, mode))


def test_ddp_rejects_sparse_gradients(device: torch.device, launched: Any) -> None:
    """What the docs say: ``sparse=True`` does not train under DDP (DDP expects the sparse
    gradients of ``nn.Embedding`` only); the default dense gradients do."""
    (result, *_) = launched(device, "ddp-sparse")
    assert result["error"] is not None
    assert "sparse" in result["error"].lower() or "NotImplementedError" in result["error"]


@pytest.mark.parametrize("mode", ["fsdp-root", "fsdp-head", "fsdp-head-resharded"])
def test_fsdp2_matches_single_process(device: torch.device, launched: Any, mode: str) -> None:
    """Every recipe trains as one process does, the usual one too: ``fully_shard(head)`` (its
    parameters resharded after its forward) then ``fully_shard(model)``."""
    results = launched(device, mode)
    _assert_matches_single_process(results)
    model = _model()
    _train(model, _global_batches(), torch.device("cpu"))
    x = _global_batches()[0][0]
    with torch.no_grad():
        expected = model[2].log_probs(model[1](model[0](x)))
    for result in results:
        torch.testing.assert_close(result["log_probs"], expected)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of the distributed tests")
    for argument in ("rank", "store", "modes", "device", "out"):
        parser.add_argument(argument)
    args = parser.parse_args()
    _worker(int(args.rank), args.store, args.modes.split(","), args.device, args.out)
