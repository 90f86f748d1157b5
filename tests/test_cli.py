"""Tests of the ``python -m hsoftmax`` command line, and the doctests of the accounting modules."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys

import pytest
import torch

from hsoftmax.__main__ import linear_cross_entropy_available, main

SMALL = ["--in-features", "32", "--num-classes", "100", "--n-bottom", "10", "--hidden", "8"]


def test_no_timing_prints_exact_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL, "--no-timing"]) == 0
    out, err = capsys.readouterr()
    assert "in_features=32, num_classes=100, n_top=10, n_bottom=10, hidden=8" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # flat 32*100+100, bottleneck 32*8+8+8*100+100, hierarchical 32*8+8+8*10+10+10*10*8+100
    assert lines["flat"][1] == "3.30k"
    assert lines["bottleneck-flat"][1] == "1.16k"
    assert lines["hierarchical"][1] == "1.25k"
    assert "suggest_shape(100) = (n_top=10, n_bottom=10)" in out
    assert "Table 1 of the paper" not in out  # only for the paper's configuration
    assert "Measured" not in out and err == ""


def test_default_is_paper_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "in_features=1792, num_classes=80000, n_top=1000, n_bottom=80, hidden=128" in out
    assert "143.44M" in out and "10.55M" in out and "10.68M" in out
    assert "Table 1 of the paper" in out and "5.70x" in out


def test_timing_small(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate on a busy machine
    try:
        assert main([*SMALL, "--batch-size", "4", "--min-run-time", "0.01"]) == 0
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert "Measured latency" in out and "batch 4" in out
    table = out[out.index("Measured latency") :].splitlines()
    assert table[1].split()[:3] == ["head", "train", "step"]
    chunked = linear_cross_entropy_available()
    rows = {line.split()[0]: line.split()[1:4] for line in table[2 : 6 if chunked else 5]}
    expected = ["flat", "flat-linear-ce", "bottleneck-flat", "hierarchical"]
    assert list(rows) == (expected if chunked else [expected[0], *expected[2:]])
    for name, values in rows.items():
        timed = values[:1] if name == "flat-linear-ce" else values
        assert all(float(v) > 0 for v in timed), (name, values)
    assert "speed-up vs flat" in out and "speed-up vs bottleneck-flat" in out
    total = 10 if chunked else 9
    assert f"[1/{total}] hierarchical" in err and f"[9/{total}] flat" in err
    if chunked:
        assert rows["flat-linear-ce"][1:] == ["-", "-"]
        assert "speed-up vs flat-linear-ce" in out and "[10/10] flat-linear-ce" in err
    else:
        assert "skipping flat-linear-ce" in err
    assert "torch threads=1" in out


def test_timing_without_linear_cross_entropy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On torch < 2.13 the chunked baseline is skipped with a message, the rest is timed."""
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    assert not linear_cross_entropy_available()
    assert main([*SMALL, "--batch-size", "2", "--min-run-time", "0.001"]) == 0
    out, err = capsys.readouterr()
    assert "skipping flat-linear-ce: torch" in err and "[9/9] flat" in err
    assert "flat-linear-ce " not in out.split("Measured latency")[1].split("train step =")[0]


def test_explicit_n_top(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL, "--n-top", "12", "--no-timing"]) == 0
    assert "n_top=12" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--num-classes", "0"], r"argument --num-classes: expected a positive integer, got '0'"),
        (["--hidden", "x"], r"argument --hidden: expected a positive integer, got 'x'"),
        (["--min-run-time", "-1"], r"expected a positive number, got '-1'"),
        (
            [*SMALL, "--n-top", "5"],
            r"expected n_top \* n_bottom >= num_classes \(100\), got 5 \* 10 = 50",
        ),
        (["--bogus"], r"unrecognized arguments: --bogus"),
    ],
    ids=["zero", "not-int", "negative-time", "too-few-slots", "unknown"],
)
def test_bad_arguments(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_module_help_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hsoftmax", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m hsoftmax")
    for flag in ("--in-features", "--num-classes", "--n-bottom", "--hidden", "--batch-size"):
        assert flag in result.stdout
    assert "--no-timing" in result.stdout
    assert result.stderr == ""  # no "No CUDA runtime is found" from torch.utils.cpp_extension
    # the examples are whole commands, not re-wrapped in the middle
    examples = result.stdout.split("examples:\n", 1)[1].splitlines()
    assert examples[0] == "  python -m hsoftmax --no-timing"
    assert examples[1].endswith("\\") and examples[2].startswith("      --batch-size")
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def test_cli_does_not_import_torch_utils_benchmark() -> None:
    """``torch.utils.benchmark`` imports ``torch.utils.cpp_extension``, which prints ``No CUDA
    runtime is found, using CUDA_HOME=...`` on a CPU machine with a CUDA build of torch."""
    code = (
        "import sys, hsoftmax.__main__ as m; m.measure(4, 6, 2, 3, 2, 2, 0.001); "
        "print(sorted(n for n in sys.modules if n.startswith(('torch.utils.benchmark', "
        "'torch.utils.cpp_extension'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module",
    [
        "hsoftmax.counting",
        "hsoftmax.classifier",
        "hsoftmax.builders",
        "hsoftmax.metrics",
        "hsoftmax.__main__",
    ],
)
def test_doctests(module: str) -> None:
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0
    assert result.failed == 0
