"""Slow, obviously-correct float64 NumPy references used by the tests (never imported by flagjax)."""

from __future__ import annotations

import numpy as np


def unit(points):
    g = np.asarray(points, np.float64)
    n = np.linalg.norm(g, axis=1, keepdims=True)
    return g / n


def dense_flag_median(points, r, *, lam=0.0, eps=1e-6, iters=10):
    """IRLS exactly as the paper writes it: an explicit weighted d x m matrix and its SVD per step.

    Columns: sqrt(a_i) x_i for every worker, and sqrt(b_ij) dhat_ij for every ordered pair i != j
    (the d x (p + p(p-1)) matrix the released code builds when lam > 0). Returns (Y, trace) where
    trace[t] is the objective after t reweighting steps (trace[0] = flag mean).
    """
    X = unit(points).T  # d x p
    d, p = X.shape
    pairs = [(i, j) for i in range(p) for j in range(p) if i != j]
    dh = []
    for i, j in pairs:
        v = X[:, i] - X[:, j]
        dh.append(v / np.linalg.norm(v))
    dh = np.stack(dh, axis=1) if pairs else np.zeros((d, 0))
    coef = lam / max(p - 1, 1)

    def obj(Y):
        s = 1 - np.sum((Y.T @ X) ** 2, axis=0)
        t = 1 - np.sum((Y.T @ dh) ** 2, axis=0)
        return np.sum(np.sqrt(np.clip(s, 0, None))) + coef * np.sum(np.sqrt(np.clip(t, 0, None)))

    def solve(a, b):
        cols = [X * np.sqrt(a)[None, :]]
        if lam > 0:
            cols.append(dh * np.sqrt(b)[None, :])
        M = np.concatenate(cols, axis=1)
        U, _, _ = np.linalg.svd(M, full_matrices=False)
        return U[:, :r]

    a = np.ones(p)
    b = np.full(len(pairs), coef)
    Y = solve(a, b)
    trace = [obj(Y)]
    for _ in range(iters):
        s = 1 - np.sum((Y.T @ X) ** 2, axis=0)
        t = 1 - np.sum((Y.T @ dh) ** 2, axis=0)
        a = 1 / np.sqrt(np.clip(s, 0, None) + eps)
        b = coef / np.sqrt(np.clip(t, 0, None) + eps)
        Y = solve(a, b)
        trace.append(obj(Y))
    return Y, np.array(trace)


def released_code_flag(points, r, *, lam=0.0):
    """The authors' released aggregator for d >> p: flag mean (one SVD of uniform weights), then
    (1/r) Y Y^T X 1 on unit gradients."""
    Y, _ = dense_flag_median(points, r, lam=lam, iters=0)
    X = unit(points).T
    return Y @ (Y.T @ X.sum(axis=1)) / r


def projector_distance(Y1, Y2):
    """Frobenius norm of the difference of orthogonal projectors onto span(Y1), span(Y2)."""
    return np.linalg.norm(Y1 @ Y1.T - Y2 @ Y2.T)
