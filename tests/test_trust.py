"""Regression tests for results that were once silently wrong, and for the switch between the
reference path and the fast paths. Each test failed before its fix."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import hsoftmax
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax, bounds, fast_bottom, fastpaths


def _head(seed: int = 0, **kwargs: object) -> HierarchicalSoftmax:
    torch.manual_seed(seed)
    kwargs.setdefault("dtype", torch.float64)
    return HierarchicalSoftmax(6, n_top=4, n_bottom=5, hidden=3, **kwargs)  # type: ignore[arg-type]


def _einsum_loss(head: HierarchicalSoftmax, x: Tensor, y: Tensor) -> Tensor:
    """The loss written from the definition with einsum and log_softmax, all classes."""
    z = torch.relu(x @ head.proj.weight.T + head.proj.bias)
    top = F.log_softmax(z @ head.top.weight.T + head.top.bias, -1)
    bottom = torch.einsum("nd,tsd->nts", z, head.bottom_weight) + head.bottom_bias
    log_probs = (top[:, :, None] + F.log_softmax(bottom, -1)).flatten(1)
    return F.nll_loss(log_probs, y)


@pytest.mark.usefixtures("path")
def test_hessian_with_respect_to_the_input_is_exact() -> None:
    head = _head()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 7, 19])
    criterion = HierarchicalCrossEntropy()
    got = torch.autograd.functional.hessian(lambda v: criterion(head(v), y), x)
    expected = torch.autograd.functional.hessian(lambda v: _einsum_loss(head, v, y), x)
    torch.testing.assert_close(got, expected)


@pytest.mark.usefixtures("path")
def test_per_sample_gradients_by_vmap_of_grad() -> None:
    head = _head()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 7, 19, 3])
    params = {k: v.detach() for k, v in head.named_parameters()}
    criterion = HierarchicalCrossEntropy()

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return criterion(torch.func.functional_call(head, p, (xi[None],)), yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(4):
        expected = torch.autograd.grad(criterion(head(x[i : i + 1]), y[i : i + 1]), [
            p for p in head.parameters()
        ])
        for name, grad in zip(params, expected, strict=True):
            torch.testing.assert_close(per_sample[name][i], grad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_targets_are_read_as_class_ids(dtype: torch.dtype) -> None:
    """``-100`` is not a uint8 value: class 156 must not be ignored, nor 120 rejected."""
    torch.manual_seed(0)
    head = HierarchicalSoftmax(6, n_top=20, n_bottom=20, hidden=3, num_classes=400)
    x = torch.randn(3, 6)
    y = torch.tensor([156 if dtype == torch.uint8 else 100, 120, 0], dtype=dtype)
    loss = HierarchicalCrossEntropy()(head(x), y)
    torch.testing.assert_close(loss, F.cross_entropy(head.log_probs(x), y.long()))


def test_meta_device_initialisation_gives_a_working_head() -> None:
    """The recipe for large models and FSDP: build on meta, ``to_empty``, ``reset_parameters``."""
    for build in ("argument", "context"):
        if build == "argument":
            head = _head(num_classes=17, class_slots=None, device="meta")
        else:
            with torch.device("meta"):
                head = _head(num_classes=17)
        assert head.bottom_weight.is_meta and head.class_slots.is_meta
        head.to_empty(device="cpu")
        head.reset_parameters()
        fresh = _head(num_classes=17)
        for name, buffer in fresh.named_buffers():
            assert torch.equal(getattr(head, name), buffer), name
        lp = head.log_probs(torch.randn(2, 6, dtype=torch.float64))
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, dtype=torch.float64))


def test_meta_device_keeps_a_custom_grouping() -> None:
    slots = torch.tensor([11, 0, 5, 6, 2, 9, 1])
    head = HierarchicalSoftmax(6, 3, 4, 5, class_slots=slots, device="meta")
    head.to_empty(device="cpu")
    head.reset_parameters()
    assert torch.equal(head.class_slots, slots)
    assert head.slot_classes is not None and head.slot_classes[11] == 0


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_topk_on_non_finite_rows_returns_real_classes(bad: float) -> None:
    head = _head(num_classes=9, dtype=torch.float32)  # node 2 partly padded, node 3 empty
    x = torch.randn(4, 6)
    x[1, 2] = bad
    x[3] = bad
    expected = head.log_probs(x).topk(3)
    for k in (1, 3, 9):
        values, indices = head.topk(x, k)
        assert indices.min() >= 0 and indices.max() < 9
        assert all(len(set(row)) == k for row in indices.tolist())
    values, _ = head.topk(x, 3)
    torch.testing.assert_close(values[0], expected.values[0])  # the finite row is exact


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("option", ["weight", "label_smoothing"])
def test_ignored_rows_do_not_poison_the_loss(option: str) -> None:
    head = _head()
    x = torch.randn(3, 6, dtype=torch.float64)
    x[1] = math.nan  # a padded row
    y = torch.tensor([4, -100, 7])
    weight = torch.ones(20, dtype=torch.float64)
    weight[0] = math.inf  # an unseen class, inverse frequency
    options = {"weight": weight} if option == "weight" else {"label_smoothing": 0.1}
    loss = HierarchicalCrossEntropy(**options)(head(x), y)  # type: ignore[arg-type]
    keep = torch.tensor([0, 2])
    expected = HierarchicalCrossEntropy(**options)(head(x[keep]), y[keep])  # type: ignore[arg-type]
    torch.testing.assert_close(loss, expected)
    if option == "weight":
        expected = F.cross_entropy(head.log_probs(x[keep]), y[keep], weight=weight)
        torch.testing.assert_close(loss, expected)


@pytest.mark.usefixtures("path")
def test_a_dense_head_gives_hooks_dense_gradients_at_every_step() -> None:
    head = _head()
    head.bottom_weight.register_hook(lambda g: g.clamp(-1.0, 1.0))
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 7, 19, 3])
    for _ in range(2):  # the second step has a kept .grad
        HierarchicalCrossEntropy()(head(x), y).backward()
        assert head.bottom_weight.grad is not None
        assert head.bottom_weight.grad.layout == torch.strided


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_outputs_made_without_grad_train_nothing(mode: str) -> None:
    head = _head()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 7, 19, 3])
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        out = head(x)
    loss = HierarchicalCrossEntropy()(out, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, HierarchicalCrossEntropy()(head(x), y).detach())


@pytest.mark.usefixtures("path")
def test_predict_never_returns_a_padded_position_in_half_precision() -> None:
    head = _head(num_classes=19, dtype=torch.float16)  # slot 4 of node 3 is padded
    with torch.no_grad():
        head.top.bias.copy_(torch.tensor([-1e4, -1e4, -1e4, 1e4]))  # route to node 3
        head.bottom_bias[3] = -math.inf  # every real class of node 3 overflows to -inf
    predicted = head.predict(torch.randn(5, 6, dtype=torch.float16))
    assert predicted.max() < 19


@pytest.mark.parametrize("flag", [True, 1, np.bool_(True)], ids=["bool", "int", "numpy"])
def test_truthy_sparse_flags_give_sparse_parameters(flag: object) -> None:
    head = _head(sparse=flag)
    assert head.sparse is True
    assert len(hsoftmax.split_parameters(head)[1]) == 2


def test_invalid_class_slots_in_a_state_dict_leave_the_head_intact() -> None:
    head = _head(class_slots=torch.tensor([3, 1, 2, 0]))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    state = dict(before, class_slots=torch.tensor([3, 3, 2, 0]))
    with pytest.raises(ValueError, match="distinct positions"):
        head.load_state_dict(state)
    for name, value in head.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert head.slot_classes is not None and int(head.slot_classes[3]) == 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: torch.jit.script(_head()), TypeError, "torch.compile or torch.export"),
        (
            lambda: _head(class_slots=torch.tensor([[0, 1], [2, 3]])),
            ValueError,
            r"expected a 1-D class_slots .*got shape \(2, 2\)",
        ),
        (
            lambda: hsoftmax.SparseRowAdamW(_head().parameters(), betas=(0.9,)),
            ValueError,
            r"expected betas to be a pair \(beta1, beta2\), got \(0.9,\)",
        ),
    ],
    ids=["jit-script", "2d-class-slots", "one-beta"],
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_clear_errors(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


def test_the_switch_forces_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = fast_bottom.node_logits
    monkeypatch.setattr(fast_bottom, "node_logits", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(fastpaths, "_timings", {})
    head, x, y = _head(), torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 7, 19, 3])
    try:
        hsoftmax.use_reference_path(True)
        HierarchicalCrossEntropy()(head(x), y).backward()
        head.predict(x)
        assert not calls and not fastpaths._timings
    finally:
        hsoftmax.use_reference_path(False)
    with pytest.raises(TypeError, match="expected enabled to be a bool"):
        hsoftmax.use_reference_path("yes")  # type: ignore[arg-type]


def test_the_environment_variable_forces_the_reference_path() -> None:
    code = "import hsoftmax.fastpaths as f; print(f._policy)"
    env = {"HSOFTMAX_REFERENCE": "1", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "reference", result.stderr


@pytest.mark.parametrize("fast_is_faster", [True, False])
def test_a_fast_path_runs_only_where_measured_faster(
    monkeypatch: pytest.MonkeyPatch, fast_is_faster: bool
) -> None:
    monkeypatch.setattr(fastpaths, "_policy", "measure")
    monkeypatch.setattr(fastpaths, "_timings", {})
    runs = {"fast": 0, "reference": 0}

    def run(name: str, seconds: float):  # type: ignore[no-untyped-def]
        def call() -> None:
            runs[name] += 1
            time.sleep(seconds)

        return call

    slow, quick = 0.02, 0.005
    fast = run("fast", quick if fast_is_faster else slow)
    reference = run("reference", slow if fast_is_faster else quick)
    assert fastpaths.measured_faster("key", fast, reference) == fast_is_faster
    assert fastpaths.measured_faster("key", fast, reference) == fast_is_faster  # cached
    assert runs == {"fast": 4, "reference": 4}  # timed once: a warm-up and three rounds
    for _ in range(fastpaths._FIRST_RETIMING):
        fastpaths.measured_faster("key", fast, reference)
    assert runs == {"fast": 8, "reference": 8}  # timed again after 10 more calls
    fastpaths.clear_timings()
    assert not fastpaths._timings
    assert not fastpaths.measured_faster("tiny", run("fast", 0.0), run("reference", 0.0))
    assert runs["fast"] == 8  # a call too small to time keeps the reference, untimed


@pytest.mark.parametrize("int8_share", [0.0, 1e9], ids=["int8-slow", "int8-fast"])
def test_int8_products_are_used_only_where_measured_fast(
    monkeypatch: pytest.MonkeyPatch, int8_share: float
) -> None:
    """The capability check times the int8 product against float32 (an AVX2-only EPYC runs it
    17x more slowly): here the int8 product is made to look slow by timing it many times."""
    if not bounds._int8_products_correct():
        pytest.skip("no oneDNN int8 products here")
    monkeypatch.setattr(fastpaths, "_policy", "measure")
    monkeypatch.setattr(fastpaths, "_timings", {})
    monkeypatch.setattr(bounds, "_INT8_SHARE", 1 / 64 if int8_share == 0.0 else 1.0)
    if int8_share:  # the float32 product made slow instead
        mm = torch.mm
        monkeypatch.setattr(torch, "mm", lambda a, b: [mm(a, b) for _ in range(64)].pop())
    assert bounds._int8_products_fast() == bool(int8_share)
