"""Shared test configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from hsoftmax import fastpaths

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py and tests/strategies.py

# The fixtures below set state that holds for every example of a test.
settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile("default")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device the tests can run on: ``cpu`` always, ``cuda`` when available."""
    return torch.device(request.param)


@pytest.fixture(params=["reference", "fast"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test that takes it runs twice: on the reference path alone, and with every fast
    path taken wherever it applies (whatever this machine's timings say)."""
    monkeypatch.setattr(fastpaths, "_policy", request.param)
    return str(request.param)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast paths taken wherever they apply."""
    monkeypatch.setattr(fastpaths, "_policy", "fast")
