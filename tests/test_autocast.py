"""Mixed precision: ``torch.autocast`` and a head cast entirely to a half-precision dtype.

The error of the head against a float64 reference must be no worse than the error of a naive
implementation written at the same precision (full logits and ``log_softmax`` in half
precision), plus a small epsilon.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import hsoftmax.functional as HF
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax

N_TOP, N_BOTTOM, NUM_CLASSES = 16, 12, 180  # 12 empty positions: masks are exercised


LOW_DTYPES = ["bfloat16", *(["float16"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=LOW_DTYPES)
def low(request: pytest.FixtureRequest, device: torch.device) -> torch.dtype:
    """Autocast dtypes: bf16 everywhere, and fp16 on CUDA (skipped on CPU of a GPU machine)."""
    if request.param == "float16" and device.type != "cuda":
        pytest.skip("autocast to float16 is tested on CUDA only")
    return getattr(torch, request.param)


def _head(device: torch.device, seed: int = 0) -> HierarchicalSoftmax:
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randperm(N_TOP * N_BOTTOM, generator=generator)[:NUM_CLASSES]
    torch.manual_seed(seed)
    return HierarchicalSoftmax(32, N_TOP, N_BOTTOM, 24, class_slots=slots).to(device)


def _inputs(device: torch.device, batch: int = 64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(batch, 32, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return x.to(device), y.to(device)


def _reference_log_probs(head: HierarchicalSoftmax, x: Tensor) -> Tensor:
    """The same head in float64."""
    head64 = HierarchicalSoftmax(
        head.in_features,
        head.n_top,
        head.n_bottom,
        head.hidden,
        class_slots=head.class_slots,
        dtype=torch.float64,
        device=x.device,
    )
    head64.load_state_dict(head.state_dict())
    with torch.no_grad():
        return head64.log_probs(x.double())


def _naive_log_probs(head: HierarchicalSoftmax, x: Tensor, dtype: torch.dtype) -> Tensor:
    """What a user would write: every class's logit and both ``log_softmax`` in ``dtype``."""
    p = {name: value.detach().to(dtype) for name, value in head.named_parameters()}
    z = torch.relu(x.to(dtype) @ p["proj.weight"].T + p["proj.bias"])
    top = torch.log_softmax(z @ p["top.weight"].T + p["top.bias"], dim=-1)
    bottom = torch.einsum("bh,tsh->bts", z, p["bottom_weight"]) + p["bottom_bias"]
    filled = torch.zeros(head.n_top * head.n_bottom, dtype=torch.bool, device=x.device)
    filled[head.class_slots] = True
    bottom = bottom.masked_fill(~filled.view(head.n_top, head.n_bottom), float("-inf"))
    every = (top.unsqueeze(-1) + torch.log_softmax(bottom, dim=-1)).view(x.shape[0], -1)
    return every[:, head.class_slots].double()


def test_autocast_error_no_worse_than_naive(device: torch.device, low: torch.dtype) -> None:
    head = _head(device)
    x, y = _inputs(device)
    reference = _reference_log_probs(head, x)
    naive = _naive_log_probs(head, x, low)
    with torch.no_grad(), torch.autocast(device.type, dtype=low):
        ours = head.log_probs(x).double()
        nll = HierarchicalCrossEntropy(reduction="none")(head(x), y).double()

    eps = 1e-3
    naive_error = (naive - reference).abs().max()
    assert (ours - reference).abs().max() <= naive_error + eps

    reference_nll = -reference.gather(1, y[:, None]).squeeze(1)
    naive_nll_error = (-naive.gather(1, y[:, None]).squeeze(1) - reference_nll).abs().max()
    assert (nll - reference_nll).abs().max() <= naive_nll_error + eps


@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["unit", "x1e3"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
def test_autocast_training_step_is_finite(
    device: torch.device, low: torch.dtype, scale: float, smoothing: float
) -> None:
    head = _head(device)
    x, y = _inputs(device)
    x = x * scale
    y[::7] = -100
    weight = torch.rand(NUM_CLASSES, device=device)
    criterion = HierarchicalCrossEntropy(weight=weight, label_smoothing=smoothing)
    with torch.autocast(device.type, dtype=low):
        loss = criterion(head(x), y)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["unit", "x1e3"])
def test_autocast_inference_is_finite_and_consistent(
    device: torch.device, low: torch.dtype, scale: float
) -> None:
    head = _head(device)
    x, _ = _inputs(device)
    x = x * scale
    with torch.no_grad(), torch.autocast(device.type, dtype=low):
        log_probs = head.log_probs(x)
        values, indices = head.topk(x, 5)
        predicted = head.predict(x)
    assert log_probs.dtype == torch.float32
    assert torch.isfinite(log_probs).all()
    assert torch.allclose(log_probs.logsumexp(-1), torch.zeros(1, device=device), atol=1e-4)
    assert torch.isfinite(values).all()
    assert ((indices >= 0) & (indices < NUM_CLASSES)).all()
    assert ((predicted >= 0) & (predicted < NUM_CLASSES)).all()
    # the exact top-k agrees with the full log-probs computed under the same autocast, up to a
    # rounding step of the logits: the two paths round them in different kernels, and at 1e3
    # times the scale the logits reach the thousands, where a float16 step is 0.5 to 1
    rtol = 0.0 if scale == 1.0 else 0.02
    torch.testing.assert_close(values, log_probs.gather(-1, indices), atol=0.05, rtol=rtol)
    torch.testing.assert_close(values, log_probs.topk(5).values, atol=0.05, rtol=rtol)


def test_autocast_gold_path_matches_log_probs(device: torch.device, low: torch.dtype) -> None:
    head = _head(device)
    x, y = _inputs(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=low):
        out = head(x)
        gold = HF.gold_log_prob(out, y)
        full = HF.log_probs(out).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(gold, full, atol=0.05, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e3], ids=["unit", "x1e3"])
def test_head_cast_to_bfloat16(device: torch.device, scale: float) -> None:
    head = _head(device).to(torch.bfloat16)
    x, y = _inputs(device)
    x = (x * scale).to(torch.bfloat16)
    y[::5] = -100
    loss = HierarchicalCrossEntropy(label_smoothing=0.1)(head(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.dtype == torch.bfloat16, name
        assert parameter.grad is not None and parameter.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(parameter.grad).all(), name
    torch.optim.SGD(head.parameters(), lr=0.1).step()

    with torch.no_grad():
        log_probs = head.log_probs(x)
        values, indices = head.topk(x, 3)
        predicted = head.predict(x)
    assert log_probs.dtype == torch.float32  # half precision inputs give float32 log-probs
    assert torch.isfinite(log_probs).all()
    assert torch.allclose(log_probs.logsumexp(-1), torch.zeros(1, device=device), atol=1e-4)
    # the CPU rounds both paths' bfloat16 logits alike; cuBLAS may round its bmm (top-k) and mm
    # (full log-probs) one bfloat16 step apart
    atol = 1e-5 if device.type == "cpu" else 0.02
    torch.testing.assert_close(values, log_probs.topk(3).values, atol=atol, rtol=0)
    torch.testing.assert_close(values, log_probs.gather(-1, indices), atol=atol, rtol=0)
    assert ((predicted >= 0) & (predicted < NUM_CLASSES)).all()


def test_bfloat16_head_error_no_worse_than_naive(device: torch.device) -> None:
    head = _head(device)
    x, _ = _inputs(device)
    reference = _reference_log_probs(head, x)
    head16 = _head(device).to(torch.bfloat16)
    head16.load_state_dict(head.state_dict())
    # the naive version sees the same rounded weights as the bf16 head
    naive = _naive_log_probs(head16, x, torch.bfloat16)
    with torch.no_grad():
        ours = head16.log_probs(x.to(torch.bfloat16)).double()
    assert (ours - reference).abs().max() <= (naive - reference).abs().max() + 1e-3
