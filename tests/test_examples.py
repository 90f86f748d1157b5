"""Every example runs in its ``--quick`` mode, in a fresh process, as a user would run it.

The committed results of the full runs are checked for presence and provenance here too.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = EXAMPLES / "results"


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path, ROOT) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(script: str, *args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, env=_env(extra_path), timeout=300, cwd=ROOT,
    )


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("script, stem", [
    ("synthetic_taxonomy.py", "synthetic_taxonomy"),
    ("language_model.py", "language_model"),
])
def test_example_quick_writes_results(script: str, stem: str, tmp_path: Path) -> None:
    result = _run(script, "--quick", "--out", str(tmp_path))
    _ok(result)
    rows = list(csv.DictReader((tmp_path / f"{stem}.csv").read_text().splitlines()))
    assert len(rows) == 5
    assert (tmp_path / f"{stem}.md").read_text().count("\n|") >= 6
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / f"{stem}.png").stat().st_size > 0


def test_ddp_quick() -> None:
    result = _run("ddp.py", "--quick")
    _ok(result)
    assert "replicas identical after 5 steps: True" in result.stdout


def test_swap_resnet_quick(capsys: pytest.CaptureFixture[str]) -> None:
    """With torchvision: runs. Without: exit status 2 and a message saying what to install
    (checked in this process: the subprocess run below covers the script itself)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        spec = importlib.util.spec_from_file_location("swap_resnet", EXAMPLES / "swap_resnet.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main(["--quick"]) == 2
        assert "pip install torchvision" in capsys.readouterr().err
    else:  # pragma: no cover - torchvision does not import on the CI machine
        result = _run("swap_resnet.py", "--quick")
        _ok(result)
        assert "exact top-5 classes" in result.stdout


FAKE_TORCHVISION = '''
"""A stand-in for torchvision: a tiny network with a ResNet's children and ``fc``."""
import types

from torch import nn


class _ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Conv2d(8, 2048, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.avgpool(self.layer1(self.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def resnet50(weights=None):
    assert weights is None
    return _ResNetLike()


models = types.SimpleNamespace(resnet50=resnet50)
'''


def test_swap_resnet_logic_with_a_stand_in_torchvision(tmp_path: Path) -> None:
    """The swap, training and inference code of the example, on a tiny ResNet-shaped model."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(textwrap.dedent(FAKE_TORCHVISION))
    result = _run("swap_resnet.py", "--quick", extra_path=tmp_path)
    _ok(result)
    assert "replaced model.fc" in result.stdout
    assert "exact top-5 classes" in result.stdout


def test_gpt_lm_head_quick(tmp_path: Path) -> None:
    """A tiny GPT-2 from transformers with flat and hierarchical LM heads, if it imports."""
    result = _run("gpt_lm_head.py", "--quick", "--out", str(tmp_path))
    if result.returncode == 2 and "pip install transformers" in result.stderr:
        pytest.skip("transformers cannot be imported here")
    _ok(result)
    assert "perplexity floor" in result.stdout
    rows = list(csv.DictReader((tmp_path / "gpt_lm_head.csv").read_text().splitlines()))
    assert [r["head"] for r in rows] == ["flat tied", "flat untied", "hier", "hier random"]
    assert all(float(r["valid_ppl"]) > float(r["oracle_ppl"]) for r in rows)
    assert rows[0]["head_params"] == "0"  # tied to the input embedding
    assert (tmp_path / "gpt_lm_head.md").read_text().count("\n|") >= 5


def test_gpt_lm_head_without_transformers(tmp_path: Path) -> None:
    """Exit status 2 and what to install, with a transformers that cannot be imported."""
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text("raise ImportError('stand-in')\n")
    result = _run("gpt_lm_head.py", "--quick", extra_path=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install transformers" in result.stderr


@pytest.mark.parametrize("stem, rows", [("synthetic_taxonomy", 5), ("language_model", 5)])
def test_committed_results_come_from_full_runs(stem: str, rows: int) -> None:
    table = (RESULTS / f"{stem}.md").read_text()
    assert f"`python examples/{stem}.py`" in table  # the full command, not --quick
    assert len(list(csv.DictReader((RESULTS / f"{stem}.csv").read_text().splitlines()))) == rows
    assert (RESULTS / f"{stem}.png").exists()


def test_committed_gpt_lm_head_results_come_from_a_full_run() -> None:
    table = (RESULTS / "gpt_lm_head.md").read_text()
    assert "`python examples/gpt_lm_head.py`" in table  # the full command, not --quick
    rows = list(csv.DictReader((RESULTS / "gpt_lm_head.csv").read_text().splitlines()))
    assert [r["head"] for r in rows] == ["flat tied", "flat untied", "hier", "hier random"]
    assert len({(r["steps"], r["vocab"]) for r in rows}) == 1  # one budget and vocabulary
