"""What the training-step benchmarks share: timing several setups round-robin."""

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
