"""Export: ``torch.export`` and ONNX (run through onnxruntime) of the inference path.

``log_probs``, ``predict`` and ``topk`` export with a dynamic batch dimension: under export
they take the reference path (``topk`` is then ``log_probs(x).topk(k)``). Every check runs the
exported graph on a batch size and values unlike the ones traced, so that a branch frozen at
trace time would show.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

from hsoftmax import HierarchicalSoftmax

N_TOP, N_BOTTOM, IN_FEATURES = 6, 5, 12
LAYOUTS = ["identity", "masked", "grouped"]


class Inference(nn.Module):
    """A small wrapper exporting one inference method of a head."""

    def __init__(self, head: HierarchicalSoftmax, method: str, k: int = 3) -> None:
        super().__init__()
        self.head = head
        self.method = method
        self.k = k

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.method == "log_probs":
            return self.head.log_probs(x)
        if self.method == "predict":
            return self.head.predict(x)
        values, indices = self.head.topk(x, self.k)
        return values, indices


def _head(layout: str, device: torch.device) -> HierarchicalSoftmax:
    generator = torch.Generator().manual_seed(0)
    positions = N_TOP * N_BOTTOM
    if layout == "identity":
        kwargs = {}
    elif layout == "masked":
        kwargs = {"num_classes": positions - 7}  # the last node is partly, one node fully, empty
    else:
        kwargs = {"class_slots": torch.randperm(positions, generator=generator)[: positions - 4]}
    torch.manual_seed(0)
    head = HierarchicalSoftmax(IN_FEATURES, N_TOP, N_BOTTOM, 8, **kwargs)
    with torch.no_grad():  # spread-out weights: many different nodes win
        for parameter in head.parameters():
            parameter.copy_(2 * torch.randn(parameter.shape, generator=generator))
    return head.to(device).eval()


def _traced_input(device: torch.device) -> Tensor:
    return torch.randn(4, IN_FEATURES, generator=torch.Generator().manual_seed(1)).to(device)


def _other_inputs(device: torch.device) -> list[Tensor]:
    """Batch sizes and values unlike the traced ones."""
    generator = torch.Generator().manual_seed(2)
    return [
        (5 * torch.randn(batch, IN_FEATURES, generator=generator) + shift).to(device)
        for batch, shift in ((11, 1.0), (1, -2.0), (37, 0.0))
    ]


def _as_tuple(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _assert_same(result: tuple[Tensor, ...], expected: tuple[Tensor, ...]) -> None:
    assert len(result) == len(expected)
    for got, want in zip(result, expected, strict=True):
        assert got.shape == want.shape
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got, want)


def _export(module: nn.Module, x: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ["log_probs", "predict", "topk"])
def test_torch_export_matches_eager(device: torch.device, method: str, layout: str) -> None:
    module = Inference(_head(layout, device), method).eval()
    program = _export(module, _traced_input(device))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        for x in _other_inputs(device):
            expected = _as_tuple(module(x))
            _assert_same(_as_tuple(program.module()(x)), expected)
            _assert_same(_as_tuple(loaded.module()(x)), expected)


def test_predict_export_routes_by_data(device: torch.device) -> None:
    """The exported routing picks different nodes for different rows (nothing frozen)."""
    head = _head("grouped", device)
    program = _export(Inference(head, "predict").eval(), _traced_input(device))
    x = torch.cat(_other_inputs(device))
    predicted = program.module()(x)
    nodes = head.class_slots[predicted] // N_BOTTOM
    assert nodes.unique().numel() > 1
    assert torch.equal(predicted, head.predict(x))


@pytest.mark.parametrize("method", ["log_probs", "predict", "topk"])
def test_onnx_matches_eager(device: torch.device, method: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    module = Inference(_head("grouped", device), method).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module,
        (_traced_input(device),),
        dynamo=True,
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    assert program is not None
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    with torch.no_grad():
        for x in _other_inputs(device):
            outputs = session.run(None, {name: x.cpu().numpy()})
            result = tuple(torch.from_numpy(output) for output in outputs)
            expected = tuple(t.cpu() for t in _as_tuple(module(x)))
            _assert_same(result, expected)
