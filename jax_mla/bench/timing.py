"""The one timer every benchmark row uses (op rows, layer rows and the peers
in benchmarks/), and the measure of other processes' load while it runs.

A call is timed as a user makes it: a jitted call, dispatch included, warm.
A sample is `calls` calls issued back to back and then one synchronization,
divided by `calls`; a pass is the median of `samples` samples; the result is
the best pass. On the CPU each call is synchronized (calls = 1). On a GPU the
calls are issued back to back (as FlashInfer's benchmark times its kernels),
so the device never waits for Python, and the caller rotates the inputs among
copies larger than the L2 (`copies_past_l2`) so no call reads a warm cache.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

PASSES = 3
MIN_SAMPLES, MAX_SAMPLES = 3, 50
# Back to back: enough calls that a sample lasts about BACK_TO_BACK_S.
BACK_TO_BACK_S = 0.03
MIN_CALLS, MAX_CALLS = 20, 400
# A first (warm-up) call at least this long is the measurement: timing it again
# would only double a long row's run time.
LONG_CALL_S = 2.0
# Inputs smaller than this are rotated among copies (at most MAX_COPIES) so that
# together they exceed the L2 of any current GPU (50 MB on an H100).
ROTATE_BYTES = 256e6
MAX_COPIES = 8
# A row timed while other processes kept more than this many cores busy is
# marked: on a 2-core machine its time is not trustworthy.
DISTURBED_CORES = 0.25
# /proc/stat counts in clock ticks (10 ms): a shorter timing cannot tell.
MIN_LOAD_WINDOW_S = 0.25


@dataclass(frozen=True)
class Timing:
    seconds: float  # per call
    calls: int  # calls per sample
    samples: int  # samples per pass
    passes: int


def copies_past_l2(nbytes: int) -> int:
    """How many copies of inputs of nbytes to rotate among on a GPU."""
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def time_calls(
    fn: Callable,
    make_args: Callable[[int], tuple],
    *,
    budget_s: float,
    back_to_back: bool = False,
    sync: Callable[[Any], Any] = jax.block_until_ready,
    passes: int = PASSES,
    samples: tuple[int, int] = (MIN_SAMPLES, MAX_SAMPLES),
) -> Timing:
    """Seconds per call of fn(*make_args(i)), i = 0, 1, ...

    make_args(i) runs before each sample starts, outside the timed window (a
    rotation among input copies, or fresh donated buffers). sync(x) waits until
    x (fn's output, or the arguments) is computed: jax.block_until_ready for
    JAX; a peer library passes its own (e.g. torch.cuda.synchronize). The first
    call warms up and sets the number of calls per sample and of samples per
    pass, so that a pass takes about budget_s; fn must already be compiled.
    """
    counter = itertools.count()

    def sample(calls: int) -> float:
        args = [make_args(next(counter)) for _ in range(calls)]
        sync(args)
        start = time.perf_counter()
        for a in args:
            out = fn(*a)
        sync(out)
        return (time.perf_counter() - start) / calls

    first = sample(1)
    if first >= LONG_CALL_S:
        return Timing(first, 1, 1, 1)
    calls = max(MIN_CALLS, min(MAX_CALLS, round(BACK_TO_BACK_S / first))) if back_to_back else 1
    n = max(samples[0], min(samples[1], round(budget_s / (calls * max(first, 1e-9)))))
    best = min(statistics.median(sample(calls) for _ in range(n)) for _ in range(passes))
    return Timing(best, calls, n, passes)


def _busy_s() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this
    process), from /proc/stat; None where it is unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


class OtherLoad:
    """Measures how many cores other processes kept busy during a block, so a
    timing disturbed by someone else's work on a small machine shows."""

    def __enter__(self):
        self._start, self._t0, self.cores = _busy_s(), time.perf_counter(), None
        return self

    def __exit__(self, *exc):
        end, wall = _busy_s(), time.perf_counter() - self._t0
        if self._start and end and wall >= MIN_LOAD_WINDOW_S:
            self.cores = max(0.0, (end[0] - self._start[0]) - (end[1] - self._start[1])) / wall


def disturbed(other_load: float | None) -> bool:
    return other_load is not None and other_load > DISTURBED_CORES
