"""When a fast path may replace the reference path: the switch and the timings.

The reference path (:mod:`hsoftmax.bottom` and :mod:`hsoftmax.functional`) uses public torch
ops only and defines the results. Each fast path lives in its own module and is proven equal to
it by the same contract tests:

- :mod:`hsoftmax.fast_bottom`: the bottom layers' products read in place, for training and
  routing on the CPU;
- :mod:`hsoftmax.fast_inference`: exact log-probabilities by cache-sized blocks of nodes, and
  an exact top-k that scans only the nodes that can hold a top class, with the int8 bounds of
  :mod:`hsoftmax.bounds` where int8 products are measured faster than float32 ones.

A fast path runs only where it is correct for the call (each module's ``applies``) and was
measured faster on this machine for calls of that kind: the first such call times both paths
and the answer is kept, as ``torch.backends.cudnn.benchmark`` does, and checked again after 10,
100, 1,000, ... more calls.
:func:`use_reference_path` (or the environment variable ``HSOFTMAX_REFERENCE=1``) forces the
reference path everywhere.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

__all__ = ["clear_timings", "eager", "measured_faster", "size_bucket", "use_reference_path"]

#: ``"measure"``: a fast path runs where it applies and was measured faster; ``"reference"``:
#: never; ``"fast"``: wherever it applies (for tests).
_policy = "reference" if os.environ.get("HSOFTMAX_REFERENCE", "") not in ("", "0") else "measure"


@dataclass
class _Timing:
    faster: bool  # the fast path won
    calls_left: int  # calls of this kind before timing again
    period: int  # the calls between the next two timings


_timings: dict[Hashable, _Timing] = {}
_lock = threading.Lock()
_ROUNDS = 3
#: A choice is timed again after this many calls of its kind, then 10 times as many, and so on:
#: a choice made during a burst of load on the machine does not stick for the whole process.
_FIRST_RETIMING = 10
#: A call whose reference path takes less than this keeps it: timing both paths would cost more
#: than a fast path could save.
_WORTH_TIMING_S = 1e-3


def use_reference_path(enabled: bool = True) -> None:
    """Force the plain reference path everywhere (``True``), or let the fast paths run where
    they apply and are measured faster (``False``, the default unless the environment variable
    ``HSOFTMAX_REFERENCE=1`` is set).

    Results agree either way up to float rounding; the reference path is the one to use when
    debugging, or to rule out the fast paths.

    Example:
        >>> import hsoftmax
        >>> hsoftmax.use_reference_path(True)   # plain torch ops only
        >>> hsoftmax.use_reference_path(False)  # back to measured fast paths
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"expected enabled to be a bool, got {type(enabled).__name__}")
    global _policy
    _policy = "reference" if enabled else "measure"


def clear_timings() -> None:
    """Forget the timings taken so far: the next call of each kind is timed again."""
    with _lock:
        _timings.clear()


def eager() -> bool:
    """Whether ops without a derivative or export rule may run: not compiling, not tracing, and
    no ``torch.func`` transform."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
    )


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measured_faster(
    key: Hashable, fast: Callable[[], object], reference: Callable[[], object]
) -> bool:
    """Whether the fast path may run for calls of kind ``key``.

    Under the default policy, the first call of each ``key`` runs the reference once; if it took
    less than a millisecond, the reference is kept. Otherwise the fast path runs once to warm up,
    then both run ``3`` alternating rounds, and the answer (the best round of each) is kept. The
    choice is timed again after 10 more calls of its kind, then after 100, 1,000 and so on, so
    that a choice made during a burst of load does not stick (the timing then costs under 10%
    of those calls, and ever less).

    Args:
        key: what the speed of the call depends on (device, dtypes, shapes, batch size bucket).
        fast: one call of the fast path, without side effects.
        reference: the same call by the reference path.
    """
    if _policy != "measure":
        return _policy == "fast"
    with _lock:
        known = _timings.get(key)
        if known is not None and known.calls_left > 0:
            known.calls_left -= 1
            return known.faster
    period = _FIRST_RETIMING if known is None else known.period
    faster = _time(fast, reference)
    with _lock:
        _timings[key] = _Timing(faster, period, period * 10)
    return faster


def _time(fast: Callable[[], object], reference: Callable[[], object]) -> bool:
    """Whether ``fast`` beats ``reference``: the best of 3 alternating rounds after a warm-up;
    ``False`` at once when the reference takes under a millisecond."""
    best_reference = _seconds(reference)
    if best_reference < _WORTH_TIMING_S:  # too small a call to gain from a fast path
        return False
    fast()
    best_fast = float("inf")
    for _ in range(_ROUNDS):
        best_fast = min(best_fast, _seconds(fast))
        best_reference = min(best_reference, _seconds(reference))
    return best_fast < best_reference


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: calls whose sizes share a bucket share a timing."""
    return 1 << max(0, int(n) - 1).bit_length()
