"""What the benchmarks share: the median time of a call, and timing several training setups round-robin."""

from __future__ import annotations

import statistics
import time

import jax


def time_interleaved(setups: dict, steps: int) -> dict[str, float]:
    """Median ms per step for each ``flagjax.train.Setup``, timed round-robin (one step of each in turn,
    each blocked on) after every setup has run and compiled two warm-up steps, so that a device or
    machine still warming up, or drifting, does not favour whichever setup happens to be timed last (the
    first GPU run timed the mean first with a cold device: 4.4 ms against 1.8 ms later)."""
    states = {k: su.state for k, su in setups.items()}
    times: dict[str, list[float]] = {k: [] for k in setups}
    for s in range(steps + 2):
        for k, su in setups.items():
            x, y = su.batch(s)
            t0 = time.perf_counter()
            states[k], m = su.step(states[k], x, y)
            jax.block_until_ready(m)
            if s >= 2:
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def median_seconds(fn, *args, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time (s) of ``fn(*args)`` over ``repeats`` calls after ``warmup`` calls, each blocked on."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def round_robin(fns: dict, args: tuple, repeats: int) -> dict[str, float]:
    """Median ms of each ``fn(*args)``, after two warm-up calls each, timed one after the other in turn."""
    for fn in fns.values():
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}
