"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device the tests can run on: ``cpu`` always, ``cuda`` when available."""
    return torch.device(request.param)
