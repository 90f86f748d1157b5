"""Shared test configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py and tests/strategies.py

settings.register_profile("default", max_examples=60, deadline=None)
settings.load_profile("default")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device the tests can run on: ``cpu`` always, ``cuda`` when available."""
    return torch.device(request.param)
