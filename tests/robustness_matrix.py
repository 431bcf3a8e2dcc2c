"""The hostile-input matrix shared by tests/test_robustness.py and scripts/robustness_table.py.

Every registered rule x Byzantine rows of one kind x f in {1, the rule's maximum (at most (p-1)/2)}, on
p = 15 honest-looking rows (shared signal + noise, d = 64). A cell passes when the output is finite
and within the bound below of the honest mean.

Bound: ||out - m|| <= 2 R, where m is the honest mean and R = || max_i |h_i - m| || is the radius of
the honest rows' coordinate-wise envelope (>= the largest distance of an honest row to m): every rule
that picks honest rows, averages them, or stays coordinate-wise inside their range meets it. The
scale-free rules (flag, normalized_mean) are judged by direction instead: cosine to m >= 0.8.
centered_clipping (one step from zero, tau = 100) may move tau * f / p towards the attackers and keeps
(p - f) / p of the honest mean, so its bound is 2 R + (tau + ||m||) f / p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flagjax import aggregators

P, D = 15, 64
KINDS = ("nan", "+inf", "-inf", "1e38", "zeros", "copies", "denormal")
SCALE_FREE = ("flag", "normalized_mean")
ALLOWED_TO_FAIL = {"mean": "not robust: one row moves it anywhere"}


def honest_rows(seed=0, p=P, d=D):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=d)[None] + 0.3 * rng.normal(size=(p, d))).astype(np.float32)


def byzantine_rows(kind: str, honest: np.ndarray, f: int) -> np.ndarray:
    d = honest.shape[1]
    table = {
        "nan": np.full((f, d), np.nan),
        "+inf": np.full((f, d), np.inf),
        "-inf": np.full((f, d), -np.inf),
        "1e38": np.full((f, d), 1e38),
        "zeros": np.zeros((f, d)),
        "copies": np.repeat(honest[:1], f, axis=0),
        "denormal": np.full((f, d), 1e-40),
    }
    return table[kind].astype(np.float32)


def f_values(name: str, p: int = P) -> tuple[int, int]:
    top = min(aggregators.get(name).max_f(p), (p - 1) // 2)
    return tuple(sorted({1, top}))


def check_cell(name: str, kind: str, f: int, seed: int = 0) -> tuple[bool, str]:
    """(passed, detail) for one cell of the matrix."""
    h = honest_rows(seed)[: P - f]
    stack = np.concatenate([h, byzantine_rows(kind, h, f)])
    out = np.asarray(aggregators.aggregate(name, jnp.asarray(stack), f=f, key=jax.random.key(0)), np.float64)
    m = h.astype(np.float64).mean(0)
    if not np.all(np.isfinite(out)):
        return False, "non-finite output"
    R = np.linalg.norm(np.max(np.abs(h - m), axis=0))
    if name in SCALE_FREE:
        cos = out @ m / (np.linalg.norm(out) * np.linalg.norm(m) + 1e-30)
        return bool(cos >= 0.8), f"cos={cos:.3f}"
    bound = 2 * R
    if name == "centered_clipping":
        bound += (100.0 + np.linalg.norm(m)) * f / P
    dist = np.linalg.norm(out - m)
    return bool(dist <= bound), f"dist={dist:.3g} bound={bound:.3g}"


def matrix() -> list[tuple[str, str, int, bool, str]]:
    rows = []
    for name in aggregators.names():
        for kind in KINDS:
            for f in f_values(name):
                ok, detail = check_cell(name, kind, f)
                rows.append((name, kind, f, ok, detail))
    return rows
