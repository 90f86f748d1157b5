"""State round-trips: state_dict, torch.save/torch.load, pickle, deepcopy and ``.to(dtype)``
give identical outputs; a checkpoint of another shape fails to load with a clear error; the
same seed gives the same results."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax

N_TOP, N_BOTTOM, NUM_CLASSES = 5, 4, 17
LAYOUTS = ["identity", "masked", "grouped", "sparse"]


def _head(
    layout: str, device: torch.device, seed: int = 0, **kwargs: object
) -> HierarchicalSoftmax:
    generator = torch.Generator().manual_seed(seed)
    if layout == "masked":
        kwargs.setdefault("num_classes", NUM_CLASSES)
    elif layout in ("grouped", "sparse"):
        kwargs.setdefault("sparse", layout == "sparse")
        slots = torch.randperm(N_TOP * N_BOTTOM, generator=generator)[:NUM_CLASSES]
        kwargs.setdefault("class_slots", slots)
    torch.manual_seed(seed)
    return HierarchicalSoftmax(10, N_TOP, N_BOTTOM, 6, device=device, **kwargs)  # type: ignore[arg-type]


def _inputs(head: HierarchicalSoftmax, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, head.in_features, generator=generator)
    y = torch.randint(0, head.num_classes, (7,), generator=generator)
    return x.to(device), y.to(device)


def _outputs(head: HierarchicalSoftmax, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Everything a head computes, with the loss's gradients."""
    head.zero_grad(set_to_none=True)
    loss = HierarchicalCrossEntropy(label_smoothing=0.1)(head(x), y)
    loss.backward()
    with torch.no_grad():
        values, indices = head.topk(x, 4)
        result = {
            "loss": loss.detach(),
            "log_probs": head.log_probs(x),
            "predict": head.predict(x),
            "topk_values": values,
            "topk_indices": indices,
        }
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None
        grad = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad
        result[f"grad.{name}"] = grad.clone()
    head.zero_grad(set_to_none=True)
    return result


def _assert_identical(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name


def _assert_same_module(copy_: HierarchicalSoftmax, head: HierarchicalSoftmax) -> None:
    assert repr(copy_) == repr(head)
    for name, buffer in head.named_buffers():  # persistent and derived buffers alike
        other = dict(copy_.named_buffers())[name]
        assert other.dtype == buffer.dtype and torch.equal(other, buffer), name
    assert (copy_.slot_classes is None) == (head.slot_classes is None)
    assert (copy_.slot_mask is None) == (head.slot_mask is None)
    assert (copy_.node_mask is None) == (head.node_mask is None)


def _via_state_dict(head: HierarchicalSoftmax) -> HierarchicalSoftmax:
    fresh = _head("identity", head.bottom_weight.device, seed=99, **_layout_kwargs(head))
    fresh.load_state_dict(head.state_dict())
    return fresh


def _via_saved_state_dict(head: HierarchicalSoftmax) -> HierarchicalSoftmax:
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    fresh = _head("identity", head.bottom_weight.device, seed=99, **_layout_kwargs(head))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _via_saved_module(head: HierarchicalSoftmax) -> HierarchicalSoftmax:
    buffer = io.BytesIO()
    torch.save(head, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, HierarchicalSoftmax)
    return loaded


def _via_pickle(head: HierarchicalSoftmax) -> HierarchicalSoftmax:
    loaded = pickle.loads(pickle.dumps(head))
    assert isinstance(loaded, HierarchicalSoftmax)
    return loaded


def _via_dtype(head: HierarchicalSoftmax) -> HierarchicalSoftmax:
    # float32 -> float64 -> float32 is exact
    return copy.deepcopy(head).to(torch.float64).to(torch.float32)


def _layout_kwargs(head: HierarchicalSoftmax) -> dict[str, object]:
    return {
        "num_classes": head.num_classes,
        "class_slots": head.class_slots.cpu(),
        "sparse": head.sparse,
    }


ROUND_TRIPS: dict[str, Callable[[HierarchicalSoftmax], HierarchicalSoftmax]] = {
    "state_dict": _via_state_dict,
    "torch.save(state_dict)": _via_saved_state_dict,
    "torch.save(module)": _via_saved_module,
    "pickle": _via_pickle,
    "deepcopy": copy.deepcopy,
    "to(float64).to(float32)": _via_dtype,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
def test_round_trip_gives_identical_outputs(
    device: torch.device, round_trip: str, layout: str
) -> None:
    head = _head(layout, device)
    x, y = _inputs(head, device)
    # a trained-looking head, not a fresh one
    torch.optim.SGD(head.parameters(), lr=1.0).zero_grad()
    HierarchicalCrossEntropy()(head(x), y).backward()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter -= parameter.grad  # type: ignore[operator]
    head.zero_grad(set_to_none=True)

    expected = _outputs(head, x, y)
    copied = ROUND_TRIPS[round_trip](head)
    _assert_same_module(copied, head)
    _assert_identical(_outputs(copied, x, y), expected)
    # the copy is independent of the original
    with torch.no_grad():
        copied.bottom_weight.add_(1.0)
    _assert_identical(_outputs(head, x, y), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_float64_keeps_buffers_and_agrees(device: torch.device, layout: str) -> None:
    head = _head(layout, device)
    x, y = _inputs(head, device)
    expected = _outputs(head, x, y)
    double = copy.deepcopy(head).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert double.class_slots.dtype == torch.int64
    _assert_same_module(double, head)
    got = _outputs(double, x.double(), y)
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got[name].float(), value, msg=name)
        elif name != "topk_indices":  # ties may be broken differently
            assert torch.equal(got[name], value), name


def _slots(num_classes: int, seed: int | None) -> Tensor:
    """The identity (``seed=None``) or a random placement of ``num_classes`` classes."""
    if seed is None:
        return torch.arange(num_classes)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(N_TOP * N_BOTTOM, generator=generator)[:num_classes]


@pytest.mark.parametrize("num_classes", [N_TOP * N_BOTTOM, NUM_CLASSES], ids=["full", "masked"])
@pytest.mark.parametrize(
    ("source", "target"),
    [(None, 1), (1, None), (1, 2)],
    ids=["identity-to-grouped", "grouped-to-identity", "grouped-to-grouped"],
)
def test_loading_another_layout_of_the_same_shape(
    device: torch.device, num_classes: int, source: int | None, target: int | None
) -> None:
    """class_slots is persistent: the derived masks follow the checkpoint, not the init."""
    head = _head("identity", device, seed=1, class_slots=_slots(num_classes, source))
    other = _head("identity", device, seed=2, class_slots=_slots(num_classes, target))
    assert not torch.equal(other.class_slots, head.class_slots)
    other.load_state_dict(head.state_dict())
    _assert_same_module(other, head)
    x, y = _inputs(head, device)
    _assert_identical(_outputs(other, x, y), _outputs(head, x, y))


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"n_top": N_TOP + 1}, "bottom_weight"),
        ({"n_bottom": N_BOTTOM + 1}, "bottom_weight"),
        ({"hidden": 7}, "bottom_weight"),
        ({"in_features": 11}, "proj.weight"),
        ({"num_classes": NUM_CLASSES - 1}, "class_slots"),
    ],
    ids=["n_top", "n_bottom", "hidden", "in_features", "num_classes"],
)
def test_loading_a_checkpoint_of_another_shape_fails_clearly(
    device: torch.device, change: dict[str, int], name: str
) -> None:
    head = _head("masked", device)
    config = {
        "in_features": 10,
        "n_top": N_TOP,
        "n_bottom": N_BOTTOM,
        "hidden": 6,
        "num_classes": NUM_CLASSES,
        **change,
    }
    other = HierarchicalSoftmax(
        config["in_features"],
        config["n_top"],
        config["n_bottom"],
        config["hidden"],
        num_classes=config["num_classes"],
        device=device,
    )
    with pytest.raises(RuntimeError, match=rf"size mismatch for {name}: .*shape"):
        other.load_state_dict(head.state_dict())


def test_loading_invalid_class_slots_fails_clearly(device: torch.device) -> None:
    head = _head("grouped", device)
    state = head.state_dict()
    state["class_slots"] = torch.zeros_like(state["class_slots"])  # every class at position 0
    with pytest.raises(ValueError, match="distinct positions"):
        _head("grouped", device).load_state_dict(state)


def test_same_seed_same_results(device: torch.device) -> None:
    def run(seed: int) -> dict[str, Tensor]:
        head = _head("grouped", device, seed=seed)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
        criterion = HierarchicalCrossEntropy(label_smoothing=0.1)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            x = torch.randn(8, head.in_features, generator=generator).to(device)
            y = torch.randint(0, head.num_classes, (8,), generator=generator).to(device)
            optimizer.zero_grad()
            criterion(head(x), y).backward()
            optimizer.step()
        return {name: value.detach().clone() for name, value in head.state_dict().items()}

    first, second, other = run(0), run(0), run(1)
    _assert_identical(second, first)
    assert not torch.equal(other["bottom_weight"], first["bottom_weight"])


def test_reset_parameters_under_a_seed(device: torch.device) -> None:
    head = _head("masked", device)
    torch.manual_seed(5)
    head.reset_parameters()
    state = {name: value.clone() for name, value in head.state_dict().items()}
    head.reset_parameters()
    assert not torch.equal(head.bottom_weight, state["bottom_weight"])
    torch.manual_seed(5)
    head.reset_parameters()
    _assert_identical(dict(head.state_dict()), state)
