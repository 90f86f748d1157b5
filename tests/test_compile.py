"""``torch.compile``: the training path, ``log_probs`` and ``predict`` compile with
``fullgraph=True`` (no graph break, no host sync) and match eager; ``topk`` matches eager and
compiles with graph breaks on the CPU (its scan over nodes is data-dependent), in one graph on
accelerators (the dense path).

Each test compiles once, with small shapes. The training path is compiled with inductor (what
users get by default); the other tests use the ``aot_eager`` backend, which runs the same
Dynamo capture (where ``fullgraph`` is decided) and AOTAutograd, without inductor's code
generation, to keep the suite fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax

N_TOP, N_BOTTOM, NUM_CLASSES = 5, 7, 32  # 3 empty positions

# torch's own compile stack warns about its deprecated torch.jit internals
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _head(device: torch.device) -> HierarchicalSoftmax:
    generator = torch.Generator().manual_seed(0)
    slots = torch.randperm(N_TOP * N_BOTTOM, generator=generator)[:NUM_CLASSES]
    torch.manual_seed(0)
    return HierarchicalSoftmax(16, N_TOP, N_BOTTOM, 8, class_slots=slots).to(device)


def _batch(device: torch.device, batch: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(batch, 16, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    y[::3] = -100
    return x.to(device), y.to(device)


def _grads(module: torch.nn.Module) -> dict[str, Tensor]:
    grads = {}
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        grads[name] = parameter.grad.clone()
    module.zero_grad(set_to_none=True)
    return grads


def _check_training_path(
    device: torch.device, backend: str, dynamic: bool | None, batches: list[int]
) -> None:
    head = _head(device)
    weight = torch.rand(NUM_CLASSES, generator=torch.Generator().manual_seed(2)).to(device)
    criterion = HierarchicalCrossEntropy(weight=weight, label_smoothing=0.1)

    def step(x: Tensor, y: Tensor) -> Tensor:
        return criterion(head(x), y)

    compiled = torch.compile(step, fullgraph=True, backend=backend, dynamic=dynamic)
    for seed, batch in enumerate(batches):
        x, y = _batch(device, batch, seed)
        expected = step(x, y)
        expected.backward()
        expected_grads = _grads(head)
        loss = compiled(x, y)
        loss.backward()
        torch.testing.assert_close(loss, expected)
        for name, grad in _grads(head).items():
            torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_training_path_fullgraph_inductor(device: torch.device) -> None:
    _check_training_path(device, "inductor", dynamic=None, batches=[6])


def test_training_path_fullgraph_dynamic_batch(device: torch.device) -> None:
    # one graph for every batch size: no branch frozen on the traced batch
    _check_training_path(device, "aot_eager", dynamic=True, batches=[6, 11, 2])


def _compiled_loss_of_a_bad_target(device: torch.device) -> None:
    """Compile the loss, then call it with a target out of range (it must fail)."""
    head = _head(device)
    criterion = HierarchicalCrossEntropy()
    compiled = torch.compile(
        lambda x, y: criterion(head(x), y), fullgraph=True, backend="aot_eager"
    )
    x, y = _batch(device, 4, 0)
    compiled(x, y)
    y[1] = NUM_CLASSES
    compiled(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()


def test_compiled_training_path_still_checks_targets(device: torch.device) -> None:
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="expected target in"):
            _compiled_loss_of_a_bad_target(device)
        return
    # on a GPU the check is a device-side assert, which ends the process's use of the device
    here = Path(__file__).resolve().parent
    call = f"_compiled_loss_of_a_bad_target(torch.device({device.type!r}))"
    code = f"import torch, test_compile; test_compile.{call}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0
    assert "expected target in" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("method", ["log_probs", "predict"])
def test_inference_fullgraph(device: torch.device, method: str) -> None:
    head = _head(device).eval()
    function: Callable[[Tensor], Tensor] = getattr(head, method)
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for seed, batch in enumerate([6, 13]):
            x, _ = _batch(device, batch, seed)
            x = x * (seed + 1)
            result = compiled(x)
            if method == "predict":
                assert torch.equal(result, function(x))
            else:
                torch.testing.assert_close(result, function(x))


def test_topk_compiles_and_matches(device: torch.device) -> None:
    head = _head(device).eval()
    compiled = torch.compile(head.topk, backend="aot_eager")
    with torch.no_grad():
        for seed, batch in enumerate([6, 6]):
            x, _ = _batch(device, batch, seed)
            values, indices = compiled(x, 4)
            expected_values, expected_indices = head.topk(x, 4)
            torch.testing.assert_close(values, expected_values)
            assert torch.equal(indices, expected_indices)


def test_topk_compiles_in_one_graph(device: torch.device) -> None:
    """Compiled, ``topk`` takes the reference path (``log_probs(x).topk(k)``): no graph break."""
    head = _head(device).eval()
    x, _ = _batch(device, 6, 0)
    with torch.no_grad():
        explanation = torch._dynamo.explain(head.topk)(x, 4)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_compiled_training_accumulates_like_eager(device: torch.device, sparse: bool) -> None:
    """Two backward passes into kept gradients (``zero_grad(set_to_none=False)``), compiled
    and eager, give the same gradients (compiled graphs take the reference path and give
    dense gradients even with ``sparse=True``)."""
    eager, compiled_head = _head(device), _head(device)
    eager.sparse = compiled_head.sparse = sparse
    criterion = HierarchicalCrossEntropy()
    compiled = torch.compile(
        lambda x, y: criterion(compiled_head(x), y), fullgraph=True, backend="aot_eager"
    )
    for seed in range(2):
        x, y = _batch(device, 6, seed)
        criterion(eager(x), y).backward()
        compiled(x, y).backward()
    for (name, want), got in zip(eager.named_parameters(), compiled_head.parameters(), strict=True):
        assert want.grad is not None and got.grad is not None, name
        assert not got.grad.is_sparse, name
        assert want.grad.is_sparse == (sparse and name.startswith("bottom_")), name
        expected = want.grad.to_dense() if want.grad.is_sparse else want.grad
        torch.testing.assert_close(got.grad, expected, msg=name)
